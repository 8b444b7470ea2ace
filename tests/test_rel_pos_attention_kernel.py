"""The fused rel-pos attention kernel (Triton interpreter on CPU) against the reference."""
import contextlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from deepencoder_kernels.modules.sam import SamBlock, SamEncoder
from conftest import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, H, W, heads, d, window, dtype, table_rows=None, nan_margin=False):
    C = heads * d
    rows = table_rows or 2 * (window or max(H, W)) - 1
    qkv = torch.randn(B, H, W, 3 * C) * 0.5
    if nan_margin:
        # a view into a NaN-filled buffer: any read outside the real grid or channels turns to NaN
        big = torch.full((B, H + 2, W + 3, 3 * C + 16), float("nan"))
        big[:, :H, :W, : 3 * C] = qkv
        qkv = big[:, :H, :W, : 3 * C]
    tables = [torch.randn(rows, d) * 0.3 for _ in range(2)]
    pad = torch.randn(3 * C) * 0.5 if window else None
    return qkv.to(dtype), tables[0].to(dtype), tables[1].to(dtype), pad.to(dtype) if pad is not None else None


def fused(*args):
    with dk.backend("triton-interpret"):
        out = dk.ops.rel_pos_attention(*args)
    assert dk.last_backends()["rel_pos_attention"].backend == "triton-interpret"
    return out


def check(B, H, W, heads, d, window, dtype, **kw):
    qkv, th, tw, pad = make_inputs(B, H, W, heads, d, window, dtype, **kw)
    out = fused(qkv, th, tw, heads, window, pad)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    want = ref.rel_pos_attention(up(qkv), up(th), up(tw), heads, window, up(pad))
    assert out.dtype == dtype and out.shape == (B, H, W, heads * d)
    assert_close(out, want, dtype, msg=f"B={B} grid={H}x{W} heads={heads} d={d} window={window}")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,W,window", [
    (1, 16, 16, 14),     # 14x14 windows over a 16 grid: 3 of 4 windows padded (like 64 -> 70)
    (2, 14, 14, 14),     # exactly one window, no padding, batch 2
    (1, 18, 30, 14),     # non-square grid, padded on both sides
    (1, 9, 9, 4),        # small windows: partial q and k tiles
    (2, 5, 7, 3),
])
def test_windowed_matches_reference(B, H, W, window, dtype):
    check(B, H, W, 2, 64, window, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,W", [
    (1, 8, 8),           # scaled-down square grid
    (2, 10, 10),         # 40 -> scaled; partial tiles, batch 2
    (1, 5, 7),           # non-square, odd
    (1, 1, 1),           # one token
    (1, 12, 20),
])
def test_global_matches_reference(B, H, W, dtype):
    check(B, H, W, 2, 64, 0, dtype)


@pytest.mark.parametrize("H,W", [(40, 40), (65, 3)])
def test_global_real_table_sizes(H, W):
    """The on-chip table paths at real sizes: LP 128 (40 grid: 79 rows) and LP 256 (65 rows: 129)."""
    check(1, H, W, 1, 64, 0, torch.bfloat16)


def test_global_resizes_tables_for_other_grids():
    """A [127, d] table (64-grid block) on a 10x10 grid is resized to 19 rows, as upstream does."""
    qkv, th, tw, _ = make_inputs(1, 10, 10, 1, 64, 0, torch.float32, table_rows=127)
    assert_close(fused(qkv, th, tw, 1, 0, None), ref.rel_pos_attention(qkv, th, tw, 1, 0))


@pytest.mark.parametrize("d", [16, 32, 128])
def test_other_head_dims(d):
    check(1, 6, 6, 2, d, 4, torch.float32)


@pytest.mark.parametrize("window", [0, 4])
def test_no_out_of_bounds_reads(window):
    """Inputs are views into NaN-filled buffers: a read outside the real tokens would show."""
    out = check(1, 7, 9, 2, 32, window, torch.float32, nan_margin=True)
    assert not out.isnan().any()


def test_repeat_runs_are_bitwise_identical():
    qkv, th, tw, pad = make_inputs(1, 9, 9, 2, 64, 4, torch.bfloat16)
    assert torch.equal(fused(qkv, th, tw, 2, 4, pad), fused(qkv, th, tw, 2, 4, pad))


def test_unsupported_head_dim_is_explained():
    qkv, th, tw, pad = make_inputs(1, 4, 4, 1, 24, 2, torch.float32)
    with dk.backend("triton-interpret"), pytest.raises(RuntimeError, match="head_dim 24 not in"):
        dk.ops.rel_pos_attention(qkv, th, tw, 1, 2, pad)


def test_autograd_runs_the_fused_backend():
    """Under autograd the fused backend runs too (its backward: tests/test_rel_pos_attention_backward.py)."""
    qkv, th, tw, pad = make_inputs(1, 5, 5, 1, 16, 3, torch.float32)
    qkv.requires_grad_(True)
    with dk.backend("triton-interpret"):
        out = dk.ops.rel_pos_attention(qkv, th, tw, 1, 3, pad)
    assert dk.last_backends()["rel_pos_attention"].backend == "triton-interpret"
    out.sum().backward()
    assert qkv.grad is not None


@pytest.mark.parametrize("window", [14, 0])
def test_sam_block_with_fused_attention(window):
    torch.manual_seed(0)
    blk = SamBlock(128, 2, window, window or 16).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 16, 16, 128)
    with torch.no_grad():
        want = blk(x)
        with dk.backend("triton-interpret"):
            got = blk(x)
    assert_close(got, want, torch.float32)


def test_small_sam_trunk_fused_equals_reference():
    """SAM trunk (patch embed + windowed and global blocks, head_dim 64) on a 256 px image: the
    windowed blocks pad 16 -> 28, the global block resizes its [127, 64] tables to 31 rows."""
    torch.manual_seed(0)
    sam = SamEncoder(dim=64, depth=3, num_heads=1, global_blocks=(1,), neck_dim=16, out_dim=32).eval()
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "rel_pos" in n or "pos_embed" in n:
                p.normal_(0, 0.3)

    def trunk(pixels):
        x = sam.embed(pixels)
        for blk in sam.blocks:
            x = blk(x)
        return x

    pixels = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        want = trunk(pixels)
        with dk.backend("triton-interpret"):
            got = trunk(pixels)
    assert dk.last_backends()["rel_pos_attention"].backend == "triton-interpret"
    assert_close(got, want, torch.float32)


def test_interpreter_bf16_dot_is_why_the_kernel_upcasts():
    """Triton 3.9's interpreter gets ``tl.dot`` on bf16 operands wrong (fp16 is right), which is why
    the kernel upcasts bf16 dot operands under the interpreter (UPCAST_DOT). If this starts failing,
    Triton fixed it: drop UPCAST_DOT."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(x_ptr, y_ptr, o_ptr):
        r = tl.arange(0, 16)
        idx = r[:, None] * 16 + r[None, :]
        tl.store(o_ptr + idx, tl.dot(tl.load(x_ptr + idx), tl.load(y_ptr + idx)))

    x, y = torch.randn(16, 16), torch.randn(16, 16)
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        out = torch.empty(16, 16)
        dot_kernel[(1,)](x.to(dtype), y.to(dtype), out)
        errors[dtype] = (out - x.to(dtype).float() @ y.to(dtype).float()).abs().max().item()
    assert errors[torch.float16] < 1e-2
    assert errors[torch.bfloat16] > 1e3, f"bf16 interpreter dot is now right ({errors}): UPCAST_DOT can go"


@pytest.mark.parametrize("window", [0, 4])
def test_stubbed_launch_allocates_what_a_real_run_allocates(window):
    """bench_memory measures the fused path at full size with the launch stubbed (the interpreter
    would take hours); here, at a small shape, that equals a real interpreted run, byte for byte."""
    import importlib

    from deepencoder_kernels.kernels import rel_pos_attention as kernel
    from deepencoder_kernels.profiler import MemoryTracker, stubbed_launches

    op = importlib.import_module("deepencoder_kernels.ops.rel_pos_attention")
    qkv, th, tw, pad = make_inputs(1, 9, 9, 2, 64, window, torch.bfloat16)
    op.sequence_tables(th, tw, window or 9, window or 9)
    figures = []
    for stub in (False, True):
        with torch.inference_mode(), (stubbed_launches(kernel) if stub else contextlib.nullcontext()), MemoryTracker() as t:
            out = op._fused(qkv, th, tw, 2, window, pad, interpret=True)
            del out
        figures.append((t.peak, t.total))
    assert figures[0] == figures[1] and figures[0][0] == 9 * 9 * 128 * 2
