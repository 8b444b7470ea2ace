"""The fused rel-pos attention backward (Triton interpreter on CPU) against autograd through the
reference: gradients for qkv, both rel-pos tables (resize included) and pad_kv."""
import importlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from conftest import assert_close, by_device, fused_backend


def make_inputs(B, H, W, heads, d, window, dtype, table_rows=None, with_pad=True):
    C = heads * d
    rows = table_rows or 2 * (window or max(H, W)) - 1
    qkv = (torch.randn(B, H, W, 3 * C) * 0.5).to(dtype)
    th, tw = ((torch.randn(rows, d) * 0.3).to(dtype) for _ in range(2))
    pad = (torch.randn(3 * C) * 0.5).to(dtype) if window and with_pad else None
    return qkv, th, tw, pad


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def fused_grads(qkv, th, tw, pad, heads, window, dout):
    qkv, th, tw, pad = leaves(qkv, th, tw, pad)
    backend = fused_backend(qkv.device)
    with dk.backend(backend):
        out = dk.ops.rel_pos_attention(qkv, th, tw, heads, window, pad)
    assert dk.last_backends()["rel_pos_attention"].backend == backend
    inputs = [t for t in (qkv, th, tw, pad) if t is not None]
    return out, torch.autograd.grad(out, inputs, dout)


def reference_grads(qkv, th, tw, pad, heads, window, dout):
    """Autograd through the reference, in fp32 (bf16/fp16 kernels are compared against it)."""
    qkv, th, tw, pad = leaves(*(None if t is None else t.float() for t in (qkv, th, tw, pad)))
    out = ref.rel_pos_attention(qkv, th, tw, heads, window, pad)
    inputs = [t for t in (qkv, th, tw, pad) if t is not None]
    grads = torch.autograd.grad(out, inputs, dout.float(), allow_unused=True)   # pad_kv is unused without padding
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def assert_grads_close(got, want, dtype, msg):
    """Per-dtype tolerance relative to each gradient's scale (sums over many keys grow with N)."""
    for name, g, w in zip(("dqkv", "d rel_pos_h", "d rel_pos_w", "d pad_kv"), got, want):
        scale = max(1.0, w.abs().max().item())
        assert g.dtype == w.dtype or g.dtype in (torch.float16, torch.bfloat16)
        assert g.shape == w.shape, f"{name}: {g.shape} vs {w.shape}"
        assert_close(g.float() / scale, w / scale, dtype, msg=f"{msg}: {name}")


def check(B, H, W, heads, d, window, dtype, device="cpu", **kw):
    qkv, th, tw, pad = (None if t is None else t.to(device) for t in make_inputs(B, H, W, heads, d, window, dtype, **kw))
    dout = (torch.randn(B, H, W, heads * d)).to(device, dtype)
    _, got = fused_grads(qkv, th, tw, pad, heads, window, dout)
    _, want = reference_grads(qkv, th, tw, pad, heads, window, dout)
    assert_grads_close(got, want, dtype, f"B={B} grid={H}x{W} heads={heads} d={d} window={window} {dtype}")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,window", [
    (1, 9, 9, 4),        # padded windows (bottom/right), partial q and key tiles
    (2, 5, 7, 3),        # batch 2, non-square, padded on both sides
    (1, 8, 8, 4),        # windows tile the grid exactly: no padding
])
def test_windowed_gradients(B, H, W, window, dtype):
    check(B, H, W, 2, 16, window, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device,B,side,window", by_device(
    [(1, 9, 4)],   # the interpreter's edges are covered above; one case keeps the body honest on CPU
    [(B, side, window) for side in (32, 40, 64, 80) for window, batches in ((14, (1, 8)), (0, (1, 2))) for B in batches]))
def test_gradients_at_real_shapes(device, B, side, window, dtype):
    """Every mode's grid (32/40/64/80), windowed (14) and global, SAM's 12 heads of 64 on CUDA."""
    heads, d = (12, 64) if device == "cuda" else (2, 16)
    check(B, side, side, heads, d, window, dtype, device=device)


def test_windowed_real_window_size():
    """14x14 windows (196 tokens: several q/key tiles, LP 32) over a padded 16x16 grid, d = 64."""
    check(1, 16, 16, 1, 64, 14, torch.bfloat16)


def test_windowed_without_pad_kv():
    """pad_kv=None: padded tokens are zeros (no pad gradient to return)."""
    check(1, 6, 5, 2, 16, 4, torch.float32, with_pad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,W", [
    (1, 8, 8),           # scaled-down square grid
    (2, 5, 7),           # batch 2, non-square, partial tiles
    (1, 1, 1),           # one token
    (1, 4, 12),          # wide: LP_W > LP_H
])
def test_global_gradients(B, H, W, dtype):
    check(B, H, W, 2, 16, 0, dtype)


def test_global_fp16():
    check(1, 6, 7, 2, 32, 0, torch.float16)


@pytest.mark.parametrize("window,rows", [(0, 15), (4, 13)], ids=["global", "windowed"])
def test_table_resize_is_differentiated(window, rows):
    """Tables of another length are resized (linear, fp32) before the op; its gradient reaches the
    original table through autograd of the interpolation, as upstream's does."""
    check(1, 6, 6, 1, 16, window, torch.float32, table_rows=rows)


def test_global_real_table_length():
    """LP 128 tables (a 40-wide grid: 79 rows) on a short strip, d = 64."""
    check(1, 2, 40, 1, 64, 0, torch.bfloat16)


def test_full_width_small_grid():
    """SAM's real width (768 channels, 12 heads of 64) on a small grid, windowed with padding and global."""
    check(1, 6, 6, 12, 64, 4, torch.bfloat16)
    check(1, 5, 6, 12, 64, 0, torch.bfloat16)


def test_only_some_inputs_need_grad():
    qkv, th, tw, pad = make_inputs(1, 5, 5, 2, 16, 3, torch.float32)
    qkv.requires_grad_()
    with dk.backend("triton-interpret"):
        out = dk.ops.rel_pos_attention(qkv, th, tw, 2, 3, pad)
    assert dk.last_backends()["rel_pos_attention"].backend == "triton-interpret"
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, dout)
    _, want = reference_grads(qkv, th, tw, pad, 2, 3, dout)
    assert_close(got, want[0])


def test_backward_is_deterministic():
    """No float atomics: the same inputs give bitwise the same gradients."""
    qkv, th, tw, pad = make_inputs(2, 7, 6, 2, 16, 4, torch.bfloat16)
    dout = torch.randn(2, 7, 6, 32).to(torch.bfloat16)
    first = fused_grads(qkv, th, tw, pad, 2, 4, dout)[1]
    second = fused_grads(qkv, th, tw, pad, 2, 4, dout)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_forward_under_autograd_equals_inference():
    """The training forward (which also writes the logsumexp) gives the inference forward's output."""
    qkv, th, tw, pad = make_inputs(1, 6, 6, 2, 16, 4, torch.float32)
    with dk.backend("triton-interpret"):
        plain = dk.ops.rel_pos_attention(qkv, th, tw, 2, 4, pad)
        trained = dk.ops.rel_pos_attention(qkv.requires_grad_(), th, tw, 2, 4, pad)
    assert trained.requires_grad and torch.equal(plain, trained.detach())


def test_compiled_training_step_traces():
    """torch.compile(fullgraph=True) of a training step (aot_eager): AOT autograd traces the
    forward and the backward through the custom ops and gives eager's gradients."""
    inputs = make_inputs(1, 5, 5, 1, 16, 3, torch.float32)

    def loss(qkv, th, tw, pad):
        out = dk.ops.rel_pos_attention(qkv, th, tw, 1, 3, pad)
        return (out * out).sum()

    torch._dynamo.reset()
    grads = []
    with dk.backend("triton-interpret"):
        for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
            xs = leaves(*inputs)
            fn(*xs).backward()
            grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert a is not None
        assert_close(a, b)


def test_opcheck():
    mod = importlib.import_module("deepencoder_kernels.ops.rel_pos_attention")

    qkv, th, tw, pad = leaves(*make_inputs(1, 3, 3, 1, 16, 2, torch.float32))
    torch.library.opcheck(mod._rel_pos_attention_train_op, (qkv, th[:3], tw[:3], 1, 2, pad, "triton-interpret"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = mod._rel_pos_attention_train_op(qkv, th[:3], tw[:3], 1, 2, pad, "triton-interpret")
    torch.library.opcheck(mod._rel_pos_attention_backward_op,
                          (torch.randn_like(out), qkv.detach(), th[:3].detach(), tw[:3].detach(), pad.detach(),
                           out.detach(), lse, 1, 2, "triton-interpret"),
                          test_utils=("test_schema", "test_faketensor"))


def test_dq_programs_launch_in_slices(monkeypatch):
    """Past DQ_PROGRAMS programs the dq kernel launches in slices (bounded table partials, summed
    in order); forced here at a small size: 7 q tiles x 2 heads in slices of 3."""
    from deepencoder_kernels.kernels import rel_pos_attention_backward as bwd

    monkeypatch.setattr(bwd, "DQ_PROGRAMS", 3)
    assert bwd.launch_args((1, 11, 10, 96), 2, 0)["dq_programs"] == 14
    check(1, 11, 10, 2, 16, 0, torch.float32)


@pytest.mark.parametrize("window", [0, 4])
def test_stubbed_backward_launch_allocates_what_a_real_run_allocates(window):
    """bench_memory measures the fused backward's allocations at full size with its launches
    stubbed; at a small shape that equals a real interpreted run (Triton kernels allocate nothing)."""
    from deepencoder_kernels.kernels import rel_pos_attention_backward as bwd
    from deepencoder_kernels.kernels.rel_pos_attention import rel_pos_attention_fwd
    from deepencoder_kernels.profiler import MemoryTracker

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    qkv, th, tw, pad = make_inputs(1, 9, 9, 2, 16, window, torch.float32)
    out, lse = rel_pos_attention_fwd(qkv, th, tw, 2, window, pad, interpret=True, with_lse=True)
    figures = []
    for stub in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if stub:
                mp.setattr(bwd, "kernels_for", lambda interpret: (NoLaunch(), NoLaunch()))
            with torch.inference_mode(), MemoryTracker() as t:
                grads = bwd.rel_pos_attention_bwd(torch.ones_like(out), qkv, th, tw, 2, window, pad, out, lse, interpret=True)
                del grads
        figures.append((t.peak, t.total))
    assert figures[0] == figures[1]


def test_accelerated_model_trains_on_the_fused_attention():
    """accelerate()d upstream-structured DeepEncoder code: the parameters' gradients through the
    fused attention backwards (SAM blocks, CLIP attentions) equal plain autograd through upstream's code."""
    import copy

    from upstream import UpstreamDeepEncoder

    torch.manual_seed(0)
    model = UpstreamDeepEncoder()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if ("rel_pos" in name or "pos" in name or "class" in name or "bias" in name) else 0.2)
    fused = copy.deepcopy(model)
    dk.accelerate(fused)
    pixels = torch.randn(1, 3, 128, 128)
    model(pixels).square().mean().backward()
    with dk.backend("triton-interpret"):
        fused(pixels).square().mean().backward()
    used = dk.last_backends()
    assert used["rel_pos_attention"].backend == used["varlen_attention"].backend == "triton-interpret"
    for (name, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
        assert q.grad is not None, name
        scale = max(1e-3, p.grad.abs().max().item())
        assert_close(q.grad / scale, p.grad / scale, torch.float32, msg=name)
