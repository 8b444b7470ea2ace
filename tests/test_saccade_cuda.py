"""The CUDA saccade kernels on a GPU (`pytest -m gpu`): the nvcc-built extension (the op's ``cpp``
backend on CUDA tensors) and the CuPy/NVRTC path, each bit-exact against the C++ CPU op (the op only
selects and copies, so every output must be equal, not close)."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import extension, ops

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ORDERS = ("score", "spatial")
# (images, positions per image, channels, budget): SAM trunk grids of Base (64 x 64, 768 ch, Base's
# 273 tokens) and Large (80 x 80), CLIP-sized rows (1024 ch), and a budget past the radix passes' chunks
CASES = [(1, 4096, 768, 273), (8, 4096, 768, 273), (3, 6400, 768, 421), (8, 256, 1024, 64), (2, 4096, 24, 4000)]


def problem(B, N, C, k, dtype, packed, seed=0):
    """Scores with ties, NaNs, +-0 and +-inf; features bf16; packed inputs get per-image lengths and budgets
    (0 and the whole image among them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [N] * B if not packed else [max(1, N - 97 * i) for i in range(B)]
    scores = torch.randn(sum(lengths), generator=g)
    scores[3:200] = 0.25                           # a long tie
    scores[::13] = float("nan")
    scores[5::17] = -0.0
    scores[6::17] = 0.0
    scores[7] = float("inf")
    scores[8] = float("-inf")
    scores = scores.to(dtype)
    features = torch.randn(sum(lengths), C, generator=g).to(torch.bfloat16)
    if not packed:
        return scores.view(B, N), features.view(B, N, C), k, None
    ks = torch.tensor([min(n, [k, 0, n][i % 3]) for i, n in enumerate(lengths)], dtype=torch.int64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return scores, features, ks, cu


def cpu_op(scores, features, k, cu, order):
    with dk.backend("cpp"):
        out = ops.saccade_gather(scores, features, k, cu, order=order)
    assert dk.last_backends()["saccade_gather"].backend == "cpp"
    return out


def to_cuda(t):
    return t.cuda() if isinstance(t, torch.Tensor) else t


def assert_equal(got, want):
    for name, g, w in zip(("gathered", "positions", "cu_seqlens_out"), got, want):
        assert g.device.type == "cuda", name
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g.cpu(), w), f"{name} differs from the C++ CPU op"


def test_extension_was_built_with_cuda():
    """gpu_check.sh builds it with nvcc (DEEPENCODER_KERNELS_CUDA=1); a CPU-only build is a failed step."""
    assert extension.MISSING is None, extension.MISSING
    assert hasattr(extension.EXTENSION, "saccade_gather_cuda"), (
        "the extension has no CUDA entry point: rebuild with DEEPENCODER_KERNELS_CUDA=1 pip install -e .")


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,k", CASES, ids=lambda v: str(v))
def test_nvcc_extension_bit_exact_vs_cpu(B, N, C, k, dtype, order, packed):
    scores, features, ks, cu = problem(B, N, C, k, dtype, packed)
    want = cpu_op(scores, features, ks, cu, order)
    with dk.backend("cpp"):
        got = ops.saccade_gather(scores.cuda(), features.cuda(), to_cuda(ks), to_cuda(cu), order=order)
    assert dk.last_backends()["saccade_gather"].backend == "cpp"
    torch.cuda.synchronize()
    assert_equal(got, want)


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,k", CASES, ids=lambda v: str(v))
def test_cupy_nvrtc_bit_exact_vs_cpu(B, N, C, k, dtype, order, packed):
    pytest.importorskip("cupy", reason="CuPy is not installed (the 'cupy' extra; an optional import)")
    from deepencoder_kernels import cupy_saccade

    scores, features, ks, cu = problem(B, N, C, k, dtype, packed)
    want = cpu_op(scores, features, ks, cu, order)
    torch.cuda.synchronize()
    got = cupy_saccade.saccade_gather(scores.cuda(), features.cuda(), to_cuda(ks), to_cuda(cu), order=order)
    torch.cuda.synchronize()
    assert_equal(got, want)


def test_cuda_backward_scatters_like_cpu():
    scores, features, ks, cu = problem(4, 1024, 64, 100, torch.float32, packed=True)
    grads = []
    for device in ("cpu", "cuda"):
        f = features.float().to(device).requires_grad_(True)
        with dk.backend("cpp"):
            gathered, _, _ = ops.saccade_gather(scores.to(device), f, ks.to(device), cu.to(device))
        (gathered * torch.arange(gathered.shape[1], device=device)).sum().backward()
        grads.append(f.grad.cpu())
    assert torch.equal(grads[0], grads[1])
