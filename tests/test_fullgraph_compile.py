"""``torch.compile(fullgraph=True)``: every op with its default arguments on every backend (value
checks that read to the host are skipped while dynamo traces; an argument the traced call cannot do
without is named in the error), and the encoder with the default backend (inductor): single view and
packed, no graph break (the NVTX stage ranges step aside while dynamo traces), same output as eager.
The per-op traces use the ``aot_eager`` backend (what is checked is the trace, not inductor's code);
on CPU one inductor compile of the packed path (it holds every op the single view has, plus the
varlen op) and a dynamo-only trace of the single view; on CUDA both with inductor."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import extension, ops
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


# ---- every op, default arguments, every backend ------------------------------------------------

def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def compiles_like_eager(fn, backend: str):
    """``fn`` traced whole (aot_eager) under ``backend``: the same outputs as eager, bit for bit
    (the same kernels run), and the backend is the one that ran."""
    torch._dynamo.reset()
    dk.clear_last_backends()
    with torch.no_grad(), dk.backend(backend):
        want = fn()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")()
    want, got = (t if isinstance(t, tuple) else (t,) for t in (want, got))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert {c.backend for c in dk.last_backends().values()} == {backend}


def cpp_param():
    return pytest.param("cpp", marks=pytest.mark.skipif(extension.missing() is not None, reason=f"C++ extension: {extension.missing()}"))


ATTENTION_BACKENDS = ["reference", "triton-interpret"]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_varlen_attention_defaults(backend):
    """check_values=True (the default) reads cu_seqlens to the host in eager only: traced, it is skipped."""
    q, k, v = torch.randn(3, 14, 2, 16).unbind(0)
    compiles_like_eager(lambda: ops.varlen_attention(q, k, v, cu_of([5, 9]), 9), backend)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_varlen_attention_prefix_gqa_rope(backend):
    """DeepEncoder V2's call: prefix_lens, GQA 4/2 and RoPE tables, value checks on (the default)."""
    from deepencoder_kernels.reference import rope_tables

    q = torch.randn(14, 4, 16)
    k, v = torch.randn(2, 14, 2, 16).unbind(0)
    cos, sin = rope_tables(9, 16, 1e6, torch.float32)
    prefix = torch.tensor([2, 4], dtype=torch.int32)
    compiles_like_eager(lambda: ops.varlen_attention(q, k, v, cu_of([5, 9]), 9, prefix_lens=prefix, rope_cos=cos, rope_sin=sin),
                        backend)


def rel_pos_varlen_inputs():
    q, k, v = torch.randn(3, 14, 2, 16).unbind(0)
    bias = dict(rel_pos_h=torch.randn(9, 16), rel_pos_w=torch.randn(9, 16),
                grid_hw=torch.tensor([[1, 5], [3, 3]], dtype=torch.int32))
    return (q, k, v, cu_of([5, 9]), 9), bias


@pytest.mark.parametrize("backend", [
    "triton-interpret",
    pytest.param("reference", marks=pytest.mark.xfail(
        strict=True, reason="the reference's rel-pos path runs one sequence at a time from a host read of cu_seqlens/grid_hw "
                            "(reference._varlen_rel_pos): it cannot be traced whole")),
])
def test_varlen_attention_rel_pos_with_max_side(backend):
    args, bias = rel_pos_varlen_inputs()
    compiles_like_eager(lambda: ops.varlen_attention(*args, max_side=5, **bias), backend)


def test_varlen_attention_rel_pos_without_max_side_names_it():
    """Without max_side the op would read grid_hw to size its tables: traced whole, that is an error naming max_side."""
    args, bias = rel_pos_varlen_inputs()
    torch._dynamo.reset()
    with torch.no_grad(), dk.backend("triton-interpret"), pytest.raises(Exception, match="max_side"):
        torch.compile(lambda: ops.varlen_attention(*args, **bias), fullgraph=True, backend="aot_eager")()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("window", [0, 3])
def test_rel_pos_attention_defaults(backend, window):
    qkv = torch.randn(1, 5, 5, 3 * 32)
    side = window or 5
    tables = [torch.randn(2 * side - 1, 16) for _ in range(2)]
    compiles_like_eager(lambda: ops.rel_pos_attention(qkv, *tables, 2, window), backend)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_compress_defaults(backend):
    ws = [torch.randn(16, 24, 1, 1), torch.ones(16), torch.zeros(16), torch.randn(16, 16, 3, 3), torch.ones(16),
          torch.zeros(16), torch.randn(32, 16, 3, 3), torch.randn(64, 32, 3, 3)]
    x = torch.randn(1, 5, 6, 24)
    compiles_like_eager(lambda: ops.compress(x, *ws), backend)


@pytest.mark.parametrize("backend", ["reference", cpp_param()])
@pytest.mark.parametrize("kind", ["int-k", "tensor-k", "packed"])
def test_saccade_gather_defaults(backend, kind):
    """An int k sizes the output on the host; a tensor k (or packed inputs) by sum(k), which dynamo
    traces as a data-dependent size; its value checks are skipped while tracing."""
    scores, features = torch.randn(2, 10), torch.randn(2, 10, 8)
    if kind == "int-k":
        fn = lambda: ops.saccade_gather(scores, features, 3)  # noqa: E731
    elif kind == "tensor-k":
        fn = lambda: ops.saccade_gather(scores, features, torch.tensor([3, 1]))  # noqa: E731
    else:
        fn = lambda: ops.saccade_gather(scores.reshape(-1), features.reshape(20, 8), torch.tensor([3, 1]), cu_of([10, 10]))  # noqa: E731
    compiles_like_eager(fn, backend)
