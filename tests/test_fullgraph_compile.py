"""The encoder under ``torch.compile(fullgraph=True)`` with the default backend (inductor): single
view and packed, no graph break (the NVTX stage ranges step aside while dynamo traces), same output
as eager. On CPU one inductor compile of the packed path (it holds every op the single view has,
plus the varlen op) and a dynamo-only trace of the single view; on CUDA both with inductor."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels.preprocess import Views
from deepencoder_kernels.stages import nvtx_range, nvtx_stage
from conftest import assert_close, fused_backend, small_encoder

CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)


def mixed_views(device, dtype):
    """Three images: 128 / 192 px globals, one with two 128 px tiles (grids 8 and 12, windowed 14)."""
    torch.manual_seed(1)
    px = lambda s: torch.rand(3, s, s, device=device, dtype=dtype) * 2 - 1  # noqa: E731
    return [Views(px(128), None), Views(px(192), torch.stack([px(128), px(128)]), (2, 1)), Views(px(128), None)]


def encoder_on(device, dtype=torch.float32):
    return small_encoder().to(device, dtype)


def test_nvtx_stage_steps_aside_while_compiling():
    seen = []

    def f(x):
        with nvtx_stage("CLIP"):
            seen.append(type(nvtx_stage("CLIP")).__name__)
            return x + 1

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    assert seen == ["nullcontext"]
    with nvtx_range("deepencoder/compiled"):   # eager: a real range (or nothing without NVTX at all)
        pass


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_packed_encoder_compiles_fullgraph_with_inductor(device):
    """On CPU the fused ops run in Triton's interpreter (custom ops, opaque to inductor); the
    reference varlen path reads lengths to the host, so it is not what a compiled model runs."""
    enc = encoder_on(device)
    views = mixed_views(device, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(enc.encode_views_packed, fullgraph=True)
    with torch.no_grad(), dk.backend(fused_backend(device)):
        want = enc.encode_views_packed(views)
        got = compiled(views)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "eager", id="cpu-dynamo-only"),
                                            pytest.param("cuda", "inductor", id="cuda-inductor", marks=pytest.mark.gpu)])
def test_single_view_encoder_compiles_fullgraph(device, backend):
    enc = encoder_on(device)
    pixels = torch.rand(2, 3, 128, 128, device=device) * 2 - 1
    torch._dynamo.reset()
    with torch.no_grad():
        want = enc.encode_pixels(pixels)
        got = torch.compile(enc.encode_pixels, fullgraph=True, backend=backend)(pixels)
        torch._dynamo.reset()
        sam = torch.compile(enc.sam_model, fullgraph=True, backend=backend)(pixels)
    assert_close(got, want, torch.float32)
    assert_close(sam, enc.sam_model(pixels), torch.float32)


@pytest.mark.gpu
@pytest.mark.slow   # minutes of inductor: `-m "gpu and not slow"` leaves it out
@pytest.mark.parametrize("dtype", [torch.bfloat16])   # one dtype: each full-size inductor compile takes minutes
def test_real_encoder_compiles_fullgraph_on_cuda(dtype):
    """The full-size encoder (seeded random weights), Base view and a packed Tiny + Small + Base
    batch, inductor on CUDA with the compiled Triton kernels, against eager."""
    from deepencoder_kernels.profiler import random_encoder

    enc = random_encoder().to("cuda", dtype)
    pixels = torch.rand(1, 3, 1024, 1024, device="cuda", dtype=dtype) * 2 - 1
    views = [Views(torch.rand(3, s, s, device="cuda", dtype=dtype) * 2 - 1, None) for s in (512, 640, 1024)]
    torch._dynamo.reset()
    with torch.no_grad():
        want, want_packed = enc.encode_pixels(pixels), enc.encode_views_packed(views)
        got = torch.compile(enc.encode_pixels, fullgraph=True)(pixels)
        got_packed = torch.compile(enc.encode_views_packed, fullgraph=True)(views)
    # inductor fuses elementwise chains in fp32 where eager rounds each step to bf16; over 36 layers
    # that is compared norm-wise (a graph that computes something else is off by O(1))
    for g, w in zip([got, *got_packed], [want, *want_packed]):
        assert g.shape == w.shape and g.dtype == dtype
        rel = ((g.float() - w.float()).norm() / w.float().norm()).item()
        assert rel < 2e-2, f"compiled vs eager relative error {rel:.3g}"


def test_nvtx_falls_back_to_torch_cuda_nvtx(monkeypatch):
    """A GPU machine's own Python may lack the nvtx package: the ranges then go through torch.cuda.nvtx."""
    from deepencoder_kernels import stages

    calls = []
    monkeypatch.setattr(stages, "_nvtx", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: calls.append(("push", msg)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    with nvtx_stage("CLIP"):
        calls.append("work")
    assert calls == [("push", "deepencoder/CLIP"), "work", ("pop",)]
