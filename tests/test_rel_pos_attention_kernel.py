"""The fused rel-pos attention kernel against the reference: in Triton's interpreter on CPU at small
shapes that hit every edge, and compiled on CUDA (`pytest -m gpu`) at the real DeepEncoder shapes."""
import contextlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from deepencoder_kernels.modules.sam import SamBlock
from conftest import assert_close, by_device, fused_backend, small_sam

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Real shapes: every mode's trunk grid (Tiny 32, Small / Gundam tiles 40, Base 64, Large 80), 12 heads
# of 64, windowed (14, tables of 27 rows) and global (tables of 127 rows, resized per grid), batch 1 and 8.
REAL_GRIDS = [32, 40, 48, 64, 80]   # v1 Tiny, Small / Gundam tiles, V2 768 px tiles, Base, Large


def make_inputs(B, H, W, heads, d, window, dtype, table_rows=None, nan_margin=False, device="cpu"):
    C = heads * d
    rows = table_rows or 2 * (window or max(H, W)) - 1
    qkv = torch.randn(B, H, W, 3 * C) * 0.5
    if nan_margin:
        # a view into a NaN-filled buffer: any read outside the real grid or channels turns to NaN
        big = torch.full((B, H + 2, W + 3, 3 * C + 16), float("nan"))
        big[:, :H, :W, : 3 * C] = qkv
        qkv = big.to(device, dtype)[:, :H, :W, : 3 * C]   # the view made on the device (.to would copy it dense)
    tables = [torch.randn(rows, d) * 0.3 for _ in range(2)]
    pad = torch.randn(3 * C) * 0.5 if window else None
    put = lambda t: t.to(device, dtype)  # noqa: E731  (made on the CPU: same values on every device)
    return put(qkv), put(tables[0]), put(tables[1]), put(pad) if pad is not None else None


def fused(*args):
    backend = fused_backend(args[0].device)
    with dk.backend(backend):
        out = dk.ops.rel_pos_attention(*args)
    assert dk.last_backends()["rel_pos_attention"].backend == backend
    return out


def check(B, H, W, heads, d, window, dtype, device="cpu", **kw):
    qkv, th, tw, pad = make_inputs(B, H, W, heads, d, window, dtype, device=device, **kw)
    out = fused(qkv, th, tw, heads, window, pad)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    # the reference one image at a time: its dense bias at Large's global grid is 2 GB per image
    want = torch.cat([ref.rel_pos_attention(up(qkv[b:b + 1]), up(th), up(tw), heads, window, up(pad)) for b in range(B)])
    assert out.dtype == dtype and out.shape == (B, H, W, heads * d)
    assert_close(out, want, dtype, msg=f"B={B} grid={H}x{W} heads={heads} d={d} window={window}")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,B,H,W,window,heads", by_device([
    (1, 16, 16, 14, 2),     # 14x14 windows over a 16 grid: 3 of 4 windows padded (like 64 -> 70)
    (2, 14, 14, 14, 2),     # exactly one window, no padding, batch 2
    (1, 18, 30, 14, 2),     # non-square grid, padded on both sides
    (1, 9, 9, 4, 2),        # small windows: partial q and k tiles
    (2, 5, 7, 3, 2),
], [(B, s, s, 14, 12) for s in REAL_GRIDS for B in (1, 8)], ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-w{c[3]}"))
def test_windowed_matches_reference(device, B, H, W, window, heads, dtype):
    check(B, H, W, heads, 64, window, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,B,H,W,heads,table_rows", by_device([
    (1, 8, 8, 2, None),           # scaled-down square grid
    (2, 10, 10, 2, None),         # 40 -> scaled; partial tiles, batch 2
    (1, 5, 7, 2, None),           # non-square, odd
    (1, 1, 1, 2, None),           # one token
    (1, 12, 20, 2, None),
], [(B, s, s, 12, 127) for s in REAL_GRIDS for B in (1, 8)], ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}"))
def test_global_matches_reference(device, B, H, W, heads, table_rows, dtype):
    check(B, H, W, heads, 64, 0, dtype, device, table_rows=table_rows)


EDGE_DEVICES = by_device([()], [()], ids=lambda c: "edge")   # edge cases: the same small shapes on both


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("H,W", [(40, 40), (65, 3)])
def test_global_real_table_sizes(device, H, W):
    """The on-chip table paths at real sizes: LP 128 (40 grid: 79 rows) and LP 256 (65 rows: 129)."""
    check(1, H, W, 1, 64, 0, torch.bfloat16, device)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_global_resizes_tables_for_other_grids(device):
    """A [127, d] table (64-grid block) on a 10x10 grid is resized to 19 rows, as upstream does."""
    qkv, th, tw, _ = make_inputs(1, 10, 10, 1, 64, 0, torch.float32, table_rows=127, device=device)
    assert_close(fused(qkv, th, tw, 1, 0, None), ref.rel_pos_attention(qkv, th, tw, 1, 0))


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("d", [16, 32, 128])
def test_other_head_dims(device, d):
    check(1, 6, 6, 2, d, 4, torch.float32, device)


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("window", [0, 4])
def test_no_out_of_bounds_reads(device, window):
    """Inputs are views into NaN-filled buffers: a read outside the real tokens would show."""
    out = check(1, 7, 9, 2, 32, window, torch.float32, device, nan_margin=True)
    assert not out.isnan().any()


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_repeat_runs_are_bitwise_identical(device):
    qkv, th, tw, pad = make_inputs(1, 9, 9, 2, 64, 4, torch.bfloat16, device=device)
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


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("window", [14, 0])
def test_sam_block_with_fused_attention(device, window):
    torch.manual_seed(0)
    blk = SamBlock(128, 2, window, window or 16).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.1)
    blk.to(device)
    x = torch.randn(1, 16, 16, 128).to(device)
    with torch.no_grad():
        want = blk(x)
        with dk.backend(fused_backend(device)):
            got = blk(x)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_small_sam_trunk_fused_equals_reference(device):
    """SAM trunk (patch embed + windowed and global blocks, head_dim 64) on a 256 px image: the
    windowed blocks pad 16 -> 28, the global block resizes its [127, 64] tables to 31 rows."""
    sam = small_sam().to(device)
    pixels = torch.randn(1, 3, 256, 256).to(device)
    with torch.no_grad():
        want = sam.trunk(pixels)
        with dk.backend(fused_backend(device)):
            got = sam.trunk(pixels)
    assert dk.last_backends()["rel_pos_attention"].backend == fused_backend(device)
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
