import os
import sys

import pytest
import torch

# Triton picks interpreter vs compiler when kernels are decorated, so the mode is fixed in
# pytest_configure, before any test module imports deepencoder_kernels (and so triton): a run
# that selects GPU tests (`pytest -m gpu`, or DEEPENCODER_KERNELS_GPU_TESTS=1) compiles; every
# other run interprets. One process, one mode: the GPU tests never share a process with the
# interpreter tests.
GPU_ENV = "DEEPENCODER_KERNELS_GPU_TESTS"


def selects_gpu_only(markexpr: str) -> bool:
    """Whether ``-m markexpr`` keeps GPU tests and drops unmarked ones (`-m gpu`, `-m "gpu and not slow"`)."""
    if not markexpr:
        return False
    from _pytest.mark.expression import Expression

    expr = Expression.compile(markexpr)
    return expr.evaluate(lambda name: name == "gpu") and not expr.evaluate(lambda name: False)


def pytest_configure(config):
    gpu = bool(os.environ.get(GPU_ENV)) or selects_gpu_only(config.option.markexpr)
    config.gpu_process = gpu
    if gpu:
        os.environ.pop("TRITON_INTERPRET", None)   # compiled Triton only
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if "deepencoder_kernels.kernels.rel_pos_attention" in sys.modules:
        from deepencoder_kernels.dispatch import triton_interpret_mode

        if triton_interpret_mode() == gpu:
            raise pytest.UsageError("the kernels were decorated before tests/conftest.py chose Triton's mode")


def pytest_collection_modifyitems(config, items):
    if config.gpu_process:
        reason = None if torch.cuda.is_available() else "no CUDA device here (torch.cuda.is_available() is False)"
        other = "this process compiles Triton (GPU tests): the interpreter tests run in a plain `pytest` process"
    else:
        reason = "GPU tests run compiled Triton in their own process: `pytest -m gpu` (this one interprets Triton)"
        other = None
    for item in items:
        gpu = "gpu" in item.keywords
        if gpu and reason or not gpu and other:
            item.add_marker(pytest.mark.skip(reason=reason if gpu else other))


def by_device(cpu_cases, cuda_cases, ids=None):
    """One test body, two shape sets: ``cpu_cases`` run in Triton's interpreter ("interp-small"),
    ``cuda_cases`` (the real DeepEncoder shapes) run the compiled kernels, marked ``gpu``. Each case
    becomes ``(device, *case)``."""
    params = [pytest.param("cpu", *c, id=f"interp-{ids(c) if ids else i}") for i, c in enumerate(cpu_cases)]
    params += [pytest.param("cuda", *c, id=f"cuda-{ids(c) if ids else i}", marks=pytest.mark.gpu)
               for i, c in enumerate(cuda_cases)]
    return params


def fused_backend(device) -> str:
    """The fused Triton backend for a device: interpreted on CPU, compiled on CUDA."""
    return "triton" if torch.device(device).type == "cuda" else "triton-interpret"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tolerance(dtype):
    from deepencoder_kernels import config as cfg

    return cfg.TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, msg=""):
    """assert_close with the package's per-dtype tolerance table; reports the worst element."""
    from deepencoder_kernels import config as cfg

    atol, rtol = cfg.TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def small_encoder_v2(seed: int = 0, dtype=torch.float32):
    """A narrow DeepEncoderV2 (same code paths, real 768 / 1024 grids and query banks) for fast CPU tests:
    the trunk as :func:`small_encoder`'s, a 2-layer causal flow with GQA 4/2 and head dim 8."""
    from deepencoder_kernels.modules import CausalFlowEncoder, DeepEncoderV2, MlpProjector, SamEncoder

    torch.manual_seed(seed)
    enc = DeepEncoderV2(
        sam=SamEncoder(dim=64, depth=3, num_heads=1, global_blocks=(1,), neck_dim=16, out_dim=32, net2_dim=16),
        causal_flow=CausalFlowEncoder(dim=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden=48),
        projector=MlpProjector(32, 24),
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.dim() <= 2 and "weight" not in name or "rel_pos" in name or "query_" in name:
                p.normal_(0, 0.5)
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return enc.to(dtype).eval()


def small_sam(seed: int = 0):
    """A narrow SAM trunk + compressor (head dim 64, windows of 14, one global block with [127, 64]
    tables) whose rel-pos tables and positions are large enough to matter; on a 256 px image the
    windowed blocks pad 16 -> 28 and the global block resizes its tables to 31 rows."""
    from deepencoder_kernels.modules import SamEncoder

    torch.manual_seed(seed)
    sam = SamEncoder(dim=64, depth=3, num_heads=1, global_blocks=(1,), neck_dim=16, out_dim=32).eval()
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "rel_pos" in n or "pos_embed" in n:
                p.normal_(0, 0.3)
    return sam


def small_encoder(seed: int = 0):
    """A narrow DeepEncoder (same code paths, real grids) for fast CPU tests."""
    from deepencoder_kernels.modules import ClipVisionModel, DeepEncoder, MlpProjector, SamEncoder

    torch.manual_seed(seed)
    enc = DeepEncoder(
        sam=SamEncoder(dim=64, depth=3, num_heads=1, global_blocks=(1,), neck_dim=16, out_dim=32),
        clip=ClipVisionModel(dim=32, depth=1, num_heads=2, hidden=64),
        projector=MlpProjector(64, 24),
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.dim() <= 2 and "weight" not in name or "rel_pos" in name:
                p.normal_(0, 0.5)
    return enc.eval()
