"""The ``sdpa-blocked`` CPU backend (ops/_sdpa_blocked.py) against the reference: rel-pos attention
(windowed and global) and the packed varlen attention (rel-pos grids, prefix-LM, GQA, RoPE), on the
edges the fused kernels are tested on, with every blocking regime forced by a small bias budget,
and the real DeepEncoder grids where the reference's dense bias is affordable on a CPU."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from deepencoder_kernels import dispatch
from deepencoder_kernels import reference as ref
from deepencoder_kernels.ops import _sdpa_blocked as blocked
from deepencoder_kernels.profiler import MemoryTracker
from conftest import assert_close, small_sam
from test_rel_pos_attention_kernel import make_inputs
from test_varlen_attention_kernel import cu_of, packed_qkv, per_sequence

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKEND = "sdpa-blocked"

# Blocking regimes forced by the bias budget (elements per block) for a call of S sequences of N
# tokens: the default (whole sequences per block where they fit), one sequence, one head, a third
# of the query rows.
REGIMES = {"default": None, "seqs": lambda S, heads, N: N * N * heads, "heads": lambda S, heads, N: N * N,
           "rows": lambda S, heads, N: N * max(1, N // 3)}
# for packed calls (sequences of several lengths): one budget, rows blocks for the longer sequences
VARLEN_BUDGETS = {"default": None, "rows": 300}


@pytest.fixture(params=list(REGIMES))
def regime(request):
    return request.param


@pytest.fixture(params=list(VARLEN_BUDGETS))
def budget(request, monkeypatch):
    if VARLEN_BUDGETS[request.param] is not None:
        monkeypatch.setattr(blocked, "BIAS_BLOCK_ELEMENTS", VARLEN_BUDGETS[request.param])
    return request.param


def run(op, *args, **kwargs):
    with dk.backend(BACKEND):
        out = getattr(dk.ops, op)(*args, **kwargs)
    assert dk.last_backends()[op].backend == BACKEND
    return out


def assert_flash_rule(out, same, exact, dtype, msg=""):
    """fp32: the reference at fp32's tolerance. bf16 / fp16: FlashAttention's rule, the error against
    the fp32 reference at most twice the reference's own error in ``dtype`` (plus the dtype's atol):
    the backend computes half precision in fp32 where the CPU emulates it, so it can be closer to the
    exact result than the reference, never further."""
    if dtype == torch.float32:
        assert_close(out, exact, dtype, msg=msg)
        return
    err = (out.float() - exact.float()).abs().max().item()
    ref_err = (same.float() - exact.float()).abs().max().item()
    assert err <= 2 * ref_err + cfg.TOLERANCES[dtype][0], f"{msg}: error {err:.3g} vs the reference's {ref_err:.3g}"


def check(B, H, W, heads, d, window, dtype, regime="default", **kw):
    """The backend vs the reference (same dtype, and fp32 on the same inputs)."""
    qkv, th, tw, pad = make_inputs(B, H, W, heads, d, window, dtype, **kw)
    if window:
        S, N = B * (-(-H // window)) * (-(-W // window)), window * window
    else:
        S, N = B, H * W
    budget = REGIMES[regime](S, heads, N) if REGIMES[regime] else None
    with torch.inference_mode():
        with dk.backend(BACKEND):
            out = blocked.rel_pos_attention(qkv, th, tw, heads, window, pad, budget=budget) if budget else \
                dk.ops.rel_pos_attention(qkv, th, tw, heads, window, pad)
        if not budget:
            assert dk.last_backends()["rel_pos_attention"].backend == BACKEND

        # the reference one image at a time: its dense bias is 805 MB per image at Base's global grid
        def reference(cast):
            pad_ = None if pad is None else cast(pad)
            return torch.cat([ref.rel_pos_attention(cast(qkv[b:b + 1]), cast(th), cast(tw), heads, window, pad_) for b in range(B)])
        exact = reference(lambda t: t.float())
        same = exact if dtype == torch.float32 else reference(lambda t: t)
    assert out.dtype == dtype and out.shape == (B, H, W, heads * d)
    assert_flash_rule(out, same, exact, dtype, msg=f"B={B} grid={H}x{W} heads={heads} window={window} {regime}")
    return out


# ---- rel_pos_attention ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,W,window", [
    (1, 16, 16, 14),     # 3 of 4 windows padded (like 64 -> 70)
    (2, 14, 14, 14),     # one window, no padding, batch 2
    (1, 18, 30, 14),     # non-square, padded on both sides
    (1, 9, 9, 4),
    (2, 5, 7, 3),        # odd grid, padded on both sides, batch 2
    (1, 3, 3, 14),       # a grid smaller than one window
], ids=lambda c: str(c))
def test_windowed_matches_reference(B, H, W, window, dtype, regime):
    check(B, H, W, 2, 64, window, dtype, regime)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,W", [(1, 8, 8), (2, 10, 10), (1, 5, 7), (1, 1, 1), (1, 12, 20), (3, 7, 5)], ids=str)
def test_global_matches_reference(B, H, W, dtype, regime):
    check(B, H, W, 2, 64, 0, dtype, regime)


# Real shapes: 12 heads of 64, every mode's trunk grid windowed (batch 1 and 2), global where the
# reference's dense bias stays small enough for a CPU test (Tiny 32: 50 MB, Small 40: 123 MB in fp32;
# Base 64: 805 MB, fp32 only). Large's global grid is covered by the blocking regimes above.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side,B", [(32, 1), (40, 2), (64, 1), (80, 1)])
def test_real_windowed_grids(side, B, dtype):
    check(B, side, side, 12, 64, 14, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side,B", [(32, 2), (40, 1)])
def test_real_global_grids(side, B, dtype):
    check(B, side, side, 12, 64, 0, dtype, table_rows=127)


def test_base_global_grid_fp32():
    """Base's global block: 4096 tokens in query-row blocks (1024 rows per head at the default budget)."""
    assert blocked.plan(1, 12, 4096, blocked.BIAS_BLOCK_ELEMENTS) == (1, 1, 1024)
    check(1, 64, 64, 12, 64, 0, torch.float32, table_rows=127)


@pytest.mark.parametrize("window", [0, 4])
def test_strided_inputs_and_no_reads_outside(window):
    """qkv a view into a NaN-filled buffer: a read outside the real tokens or channels would show."""
    out = check(1, 7, 9, 2, 32, window, torch.float32, nan_margin=True)
    assert not out.isnan().any()


@pytest.mark.parametrize("d", [16, 24, 128])
def test_other_head_dims(d):
    check(1, 6, 6, 2, d, 4, torch.float32)


def test_tables_resized_for_other_grids():
    check(1, 10, 10, 1, 64, 0, torch.float32, table_rows=127)
    check(1, 9, 9, 1, 64, 4, torch.float32, table_rows=27)


def test_autograd_hands_over_to_the_reference():
    """Forward only: under autograd the reference runs (and says why), gradients as the reference's."""
    qkv, th, tw, pad = make_inputs(1, 5, 5, 1, 16, 3, torch.float32)
    th.requires_grad_(True)
    with dk.backend(BACKEND):
        out = dk.ops.rel_pos_attention(qkv, th, tw, 1, 3, pad)
    choice = dk.last_backends()["rel_pos_attention"]
    assert choice.backend == "reference" and "forward only" in choice.refused[BACKEND][0]
    (grad,) = torch.autograd.grad(out.sum(), th)
    th2 = th.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ref.rel_pos_attention(qkv, th2, tw, 1, 3, pad).sum(), th2)
    assert torch.equal(grad, want)


def test_sam_trunk_on_the_blocked_backend():
    """SAM trunk (windowed blocks padding 16 -> 28, a global block resizing its [127, 64] tables) through
    the modules, auto on CPU = sdpa-blocked."""
    sam = small_sam()
    pixels = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        with dk.backend("reference"):
            want = sam.trunk(pixels)
        got = sam.trunk(pixels)
    assert dk.last_backends()["rel_pos_attention"].backend == BACKEND
    assert_close(got, want, torch.float32)


def test_bias_memory_is_one_block():
    """Counted allocations of a global call (MemoryTracker): the bias exists one block at a time, so
    the peak is far below the reference's dense bias (1 x 4 x 1024 x 1024 fp32 = 16 MiB)."""
    qkv, th, tw, _ = make_inputs(1, 32, 32, 4, 32, 0, torch.float32)
    with torch.inference_mode():
        with MemoryTracker() as dense:
            ref.rel_pos_attention(qkv, th, tw, 4, 0)
        with MemoryTracker() as ours:
            blocked.rel_pos_attention(qkv, th, tw, 4, 0, None, budget=1 << 18)
    assert dense.largest >= 4 * 1024 * 1024 * 4
    assert ours.largest <= max((1 << 18) * 4, qkv.numel() * 4)   # the bias block, or the q/k/v copy
    assert ours.peak < dense.peak / 3


# ---- varlen_attention ----------------------------------------------------------------------------

LENGTHS = [[1], [3, 0, 64, 63, 65, 1, 130], [65, 101, 257]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda c: "-".join(map(str, c)))
def test_varlen_matches_per_sequence_reference(lengths, dtype):
    q, k, v = packed_qkv(sum(lengths), 2, 64, dtype, nan_margin=True)
    out = run("varlen_attention", q, k, v, cu_of(lengths), max(lengths), allow_empty=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, per_sequence(q, k, v, lengths), dtype, msg=f"lengths={lengths}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_rel_pos_grids(dtype, budget):
    grids = [(4, 4), (5, 5), (8, 8), (3, 7), (1, 1), (10, 10)]
    lengths = [h * w for h, w in grids]
    q, k, v = packed_qkv(sum(lengths), 2, 64, dtype, nan_margin=True)
    tables = [(torch.randn(27, 64) * 0.3).to(dtype) for _ in range(2)]
    out = run("varlen_attention", q, k, v, cu_of(lengths), max(lengths), rel_pos_h=tables[0], rel_pos_w=tables[1],
              grid_hw=torch.tensor(grids, dtype=torch.int32))
    assert_close(out, per_sequence(q, k, v, lengths, tables=tables, grids=grids), dtype)


def test_varlen_real_packed_sam_global_grids():
    """Tiny + Small grids packed (12 heads of 64, [127, 64] tables resized per grid), fp32."""
    grids = [(32, 32), (40, 40)]
    lengths = [h * w for h, w in grids]
    q, k, v = packed_qkv(sum(lengths), 12, 64, torch.float32)
    tables = [torch.randn(127, 64) * 0.3 for _ in range(2)]
    out = run("varlen_attention", q, k, v, cu_of(lengths), max(lengths), rel_pos_h=tables[0], rel_pos_w=tables[1],
              grid_hw=torch.tensor(grids, dtype=torch.int32))
    assert_close(out, per_sequence(q, k, v, lengths, tables=tables, grids=grids), torch.float32)


def _v2_inputs(lengths, heads, kv_heads, d, dtype):
    total = sum(lengths)
    q = (torch.randn(total, heads, d) * 0.5).to(dtype)
    k, v = ((torch.randn(total, kv_heads, d) * 0.5).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_varlen_prefix_lm_gqa_rope(kv_heads, rope, dtype):
    """DeepEncoder V2's causal-flow call: [n image tokens; n queries] with prefix n, and every prefix
    edge (0: causal, the whole length: bidirectional, 1, length - 1), GQA, RoPE, an empty sequence."""
    lengths = [12, 7, 0, 9, 5, 16]
    prefixes = [6, 0, 0, 9, 1, 15]
    q, k, v = _v2_inputs(lengths, 4, kv_heads, 16, dtype)
    extra = {}
    if rope:
        cos, sin = ref.rope_tables(16, 16, 1e4, dtype)
        extra = dict(rope_cos=cos, rope_sin=sin)
    args = (q, k, v, cu_of(lengths), 16)
    kw = dict(prefix_lens=torch.tensor(prefixes, dtype=torch.int32), allow_empty=True, **extra)
    out = run("varlen_attention", *args, **kw)
    with dk.backend("reference"):
        want = dk.ops.varlen_attention(*(t.float() if t.is_floating_point() else t for t in args[:4]), 16,
                                       **{n: (t.float() if t.is_floating_point() else t) for n, t in kw.items() if n != "allow_empty"},
                                       allow_empty=True)
    assert_close(out, want, dtype)


def test_varlen_prefix_lm_at_v2_shapes():
    """A 1024 view's sequence (256 image tokens + 256 queries) and a 768 tile's (144 + 144), 14 query heads
    on 2 kv heads of 64, RoPE at theta 1e6, fp32."""
    lengths = [512, 288]
    q, k, v = _v2_inputs(lengths, 14, 2, 64, torch.float32)
    cos, sin = ref.rope_tables(512, 64, 1e6, torch.float32)
    kw = dict(prefix_lens=torch.tensor([256, 144], dtype=torch.int32), rope_cos=cos, rope_sin=sin)
    out = run("varlen_attention", q, k, v, cu_of(lengths), 512, **kw)
    with dk.backend("reference"):
        want = dk.ops.varlen_attention(q, k, v, cu_of(lengths), 512, **kw)
    assert_close(out, want, torch.float32)


def test_varlen_rel_pos_with_prefix_and_gqa(budget):
    """Every argument at once (no DeepEncoder call does this; the op takes it): rel-pos grids, a prefix
    mask over the bias blocks, GQA."""
    grids = [(3, 4), (5, 2)]
    lengths = [12, 10]
    q, k, v = _v2_inputs(lengths, 4, 2, 16, torch.float32)
    kw = dict(rel_pos_h=torch.randn(9, 16) * 0.3, rel_pos_w=torch.randn(7, 16) * 0.3,
              grid_hw=torch.tensor(grids, dtype=torch.int32), prefix_lens=torch.tensor([5, 0], dtype=torch.int32))
    out = run("varlen_attention", q, k, v, cu_of(lengths), 12, **kw)
    with dk.backend("reference"):
        want = dk.ops.varlen_attention(q, k, v, cu_of(lengths), 12, **kw)
    assert_close(out, want, torch.float32)


def test_varlen_scale_and_equal_lengths():
    q, k, v = packed_qkv(30, 3, 32, torch.float32)
    for lengths in ([10, 10, 10], [5, 25]):
        out = run("varlen_attention", q, k, v, cu_of(lengths), max(lengths), scale=0.3)
        assert_close(out, per_sequence(q, k, v, lengths, scale=0.3), torch.float32)


def test_varlen_autograd_hands_over_to_the_reference():
    q, k, v = packed_qkv(9, 2, 16, torch.float32)
    q = q.detach().requires_grad_(True)
    with dk.backend(BACKEND):
        out = dk.ops.varlen_attention(q, k, v, cu_of([4, 5]), 5)
    assert dk.last_backends()["varlen_attention"].backend == "reference"
    out.sum().backward()
    assert q.grad is not None


def test_packed_encoder_on_the_blocked_backend():
    """encode_batch's packed path (SAM global blocks packed across sizes, CLIP over mixed lengths) on
    sdpa-blocked vs the reference."""
    from conftest import small_encoder
    from deepencoder_kernels.preprocess import Views

    enc = small_encoder()
    torch.manual_seed(1)
    px = lambda s: torch.rand(3, s, s) * 2 - 1  # noqa: E731
    views = [Views(px(128), None), Views(px(192), torch.stack([px(128), px(128)]), (2, 1))]
    with torch.no_grad():
        with dk.backend("reference"):
            want = enc.encode_views_packed(views)
        got = enc.encode_views_packed(views)
    assert dk.last_backends()["rel_pos_attention"].backend == dk.last_backends()["varlen_attention"].backend == BACKEND
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


# ---- dispatch ------------------------------------------------------------------------------------

def test_auto_picks_it_on_cpu_and_it_beats_upstream():
    qkv, th, tw, pad = make_inputs(1, 4, 4, 1, 16, 2, torch.float32)
    dk.ops.rel_pos_attention(qkv, th, tw, 1, 2, pad)
    assert dk.last_backends()["rel_pos_attention"].backend == BACKEND
    cpu = torch.device("cpu")
    assert dispatch.faster_than_upstream("rel_pos_attention", cpu, torch.float32)
    assert not dispatch.faster_than_upstream("compress", cpu, torch.float32)          # only the reference on CPU
    assert not dispatch.faster_than_upstream("rel_pos_attention", "meta", torch.float32)
    with dk.backend("reference"):
        assert not dispatch.faster_than_upstream("rel_pos_attention", cpu, torch.float32)
    assert dispatch.faster_than_upstream("varlen_attention", cpu, torch.bfloat16)
    # the flag: every backend but the reference unless declared; a bool or (device, dtype) -> bool
    make = lambda name, **kw: dispatch.Backend(name, lambda: None, ("cpu",), (torch.float32,), **kw)  # noqa: E731
    assert not make("reference").beats_upstream(cpu, torch.float32) and make("triton").beats_upstream(cpu, torch.float32)
    assert not make("cpp", faster_than_upstream=False).beats_upstream(cpu, torch.float32)
    only_fp32 = make("cpp", faster_than_upstream=lambda device, dtype: dtype == torch.float32)
    assert only_fp32.beats_upstream(cpu, torch.float32) and not only_fp32.beats_upstream(cpu, torch.bfloat16)
    assert BACKEND in dispatch.KINDS and dispatch.AUTO_ORDER["cpu"].index(BACKEND) < dispatch.AUTO_ORDER["cpu"].index("reference")


def test_plan_respects_the_budget():
    for seqs, heads, n, budget in [(25, 12, 196, 1 << 23), (1, 12, 4096, 1 << 23), (1, 12, 6400, 1 << 23), (8, 12, 1600, 1 << 23),
                                   (3, 2, 9, 7), (1, 1, 5, 1)]:
        s, h, r = blocked.plan(seqs, heads, n, budget)
        assert 1 <= s <= seqs and 1 <= h <= heads and 1 <= r <= n
        assert s * h * r * n <= max(budget, n), (seqs, heads, n, budget)
    assert blocked.plan(25, 12, 196, 1 << 22) == (9, 12, 196)      # Base windows: 9 per block
    assert blocked.plan(1, 12, 6400, 1 << 22) == (1, 1, 512)       # Large global: 512 query rows


def test_windows_exist_one_chunk_at_a_time():
    """Windowed: a few window rows end to end, so the padded windows of the whole grid (what the
    reference partitions at once) never exist together."""
    heads, d, window = 2, 128, 14      # d 128: a window's q/k/v (3 x 196 x d) outweigh its bias (196 x 196)
    qkv, th, tw, pad = make_inputs(1, 28, 26, heads, d, window, torch.float32)     # 2 x 2 windows, padded right
    all_windows = 3 * 4 * heads * window * window * d * 4
    with torch.inference_mode():
        with MemoryTracker() as ours:
            out = blocked.rel_pos_attention(qkv, th, tw, heads, window, pad, budget=2 * heads * window ** 4)
        assert_close(out, ref.rel_pos_attention(qkv, th, tw, heads, window, pad), torch.float32)
    assert ours.largest < all_windows and ours.largest == all_windows // 2      # one window row: 2 of the 4 windows


def test_v2_packed_pass_on_the_blocked_backend():
    """DeepEncoder V2 (narrow): a 2-tile dynamic page and a Base page in one packed pass (causal-flow
    sequences of 288 and 512 with their prefixes, GQA, RoPE) on sdpa-blocked vs the reference."""
    from PIL import Image

    from conftest import small_encoder_v2

    def page(size, seed):
        g = torch.Generator().manual_seed(seed)
        return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())

    enc = small_encoder_v2()
    pages, modes = [page((1536, 768), 2), page((900, 1300), 4)], ["dynamic", "base"]
    with torch.no_grad():
        with dk.backend("reference"):
            want = enc.encode_batch(pages, modes)
        got = enc.encode_batch(pages, modes)
    assert dk.last_backends()["varlen_attention"].backend == BACKEND
    assert dk.last_backends()["rel_pos_attention"].backend == BACKEND
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_varlen_refuses_fake_sequence_metadata():
    """Fake cu_seqlens outside a fake mode (a Packing made during a counting pass, reused in a real one)
    have no values to read: the backend says so and the dispatcher moves on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cu = FakeTensorMode().from_tensor(cu_of([4, 5]))
    q = torch.randn(9, 2, 16)
    args = (q, q, q, cu, 5, None, None, None, None, 0, None, None, None)
    chosen = dispatch.select("varlen_attention", q.device, q.dtype, args)
    assert chosen.name == "reference"
    assert "fake tensor" in dk.last_backends()["varlen_attention"].refused[BACKEND][0]
