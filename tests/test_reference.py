"""The oracle against hand-built cases and the upstream-structured stand-ins."""
import math

import pytest
import torch
import torch.nn.functional as F

from deepencoder_kernels import reference as ref
from deepencoder_kernels.modules.sam import SamBlock
from upstream import UpstreamBlock, UpstreamCompressor, upstream_get_rel_pos


def test_window_partition_pads_bottom_right_in_row_major_order():
    x = torch.arange(5 * 5, dtype=torch.float32).view(1, 5, 5, 1)
    windows, (Hp, Wp) = ref.window_partition(x, 3, pad_value=torch.tensor([-1.0]))
    assert (Hp, Wp) == (6, 6) and windows.shape == (4, 3, 3, 1)
    assert windows[0, :, :, 0].tolist() == [[0, 1, 2], [5, 6, 7], [10, 11, 12]]
    assert windows[1, :, :, 0].tolist() == [[3, 4, -1], [8, 9, -1], [13, 14, -1]]   # right window
    assert windows[2, :, :, 0].tolist() == [[15, 16, 17], [20, 21, 22], [-1, -1, -1]]
    assert windows[3, 2, 2, 0] == -1
    back = ref.window_unpartition(windows, 3, (Hp, Wp), (5, 5))
    assert torch.equal(back, x)


def test_rel_pos_bias_matches_direct_loop():
    h, w, d = 3, 4, 5
    q = torch.randn(1, 1, h * w, d, dtype=torch.float64)
    table_h, table_w = torch.randn(2 * h - 1, d, dtype=torch.float64), torch.randn(2 * w - 1, d, dtype=torch.float64)
    bias = ref.rel_pos_bias(q, table_h, table_w, h, w)[0, 0]
    for y in range(h):
        for x in range(w):
            for y2 in range(h):
                for x2 in range(w):
                    qv = q[0, 0, y * w + x]
                    want = qv @ table_h[y - y2 + h - 1] + qv @ table_w[x - x2 + w - 1]
                    assert torch.allclose(bias[y * w + x, y2 * w + x2], want)


def test_rel_pos_resize_is_linear_interpolation_in_fp32():
    table = torch.randn(127, 8, dtype=torch.bfloat16)
    out = ref.resize_rel_pos(table, 79)
    assert out.dtype == torch.bfloat16 and out.shape == (79, 8)
    # align_corners=False: source coordinate (i + 0.5) * L / n - 0.5, clamped at 0
    src = table.float()
    for i in (0, 1, 40, 78):
        s = max((i + 0.5) * 127 / 79 - 0.5, 0.0)
        lo = int(math.floor(s))
        hi = min(lo + 1, 126)
        want = src[lo] * (1 - (s - lo)) + src[hi] * (s - lo)
        torch.testing.assert_close(out[i].float(), want.to(torch.bfloat16).float(), atol=1e-2, rtol=0)
    assert torch.equal(ref.resize_rel_pos(table, 127), table)
    assert torch.equal(ref.rel_pos_lookup(40, table.float()), upstream_get_rel_pos(40, 40, table.float()))


def _copy_block(ours: SamBlock, theirs: UpstreamBlock):
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("grid,window", [(9, 4), (8, 4), (7, 14), (5, 0), (6, 0), (11, 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_sam_block_matches_upstream_structure(grid, window, batch):
    """Padded windows (keys = qkv bias, unmasked), global grids, batch 1 and 2, fp32 ~1e-5."""
    dim, heads = 32, 2
    size = window if window else grid
    ours = SamBlock(dim, heads, window, size).eval()
    ours.mlp = type(ours.mlp)(dim, 4 * dim)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
    theirs = UpstreamBlock(dim, heads, window, (grid, grid)).eval()
    _copy_block(ours, theirs)
    x = torch.randn(batch, grid, grid, dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_global_block_resizes_rel_pos_for_other_grids():
    """A global block built for 64x64 ([127, d] tables) run on a 10x10 grid resizes to 19 rows."""
    dim, heads = 16, 1
    ours = SamBlock(dim, heads, 0, 64).eval()
    ours.mlp = type(ours.mlp)(dim, 4 * dim)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
    theirs = UpstreamBlock(dim, heads, 0, (64, 64)).eval()
    _copy_block(ours, theirs)
    x = torch.randn(1, 10, 10, dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_padded_keys_are_the_qkv_bias_and_unmasked():
    """Changing the qkv bias of padded tokens changes real outputs in edge windows only."""
    qkv = torch.randn(1, 5, 5, 3 * 8)
    table = torch.randn(5, 8)
    a = ref.rel_pos_attention(qkv, table, table, 1, 3, pad_kv=torch.zeros(24))
    b = ref.rel_pos_attention(qkv, table, table, 1, 3, pad_kv=torch.ones(24))
    assert torch.equal(a[:, :3, :3], b[:, :3, :3])          # interior window: no padding in it
    assert not torch.allclose(a[:, :3, 3:], b[:, :3, 3:])    # right edge window attends to padding


@pytest.mark.parametrize("grid", [8, 10, 5])
def test_compress_matches_upstream_chain(grid):
    chain = UpstreamCompressor(24, 16, 12, 20).eval()
    with torch.no_grad():
        for p in chain.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, grid, grid, 24)
    n0, n1, n2, n3 = chain.neck
    out = ref.compress(x, n0.weight, n1.weight, n1.bias, n2.weight, n3.weight, n3.bias, chain.net_2.weight, chain.net_3.weight)
    want = chain(x)
    assert out.shape == (2, want.shape[2] * want.shape[3], 20)
    torch.testing.assert_close(out, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_varlen_reference_equals_per_sequence_sdpa():
    lengths = [1, 7, 0, 13]
    cu = torch.tensor([0, 1, 8, 8, 21], dtype=torch.int32)
    q, k, v = (torch.randn(21, 2, 16) for _ in range(3))
    out = ref.varlen_attention(q, k, v, cu)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        if n:
            want = F.scaled_dot_product_attention(*(t[s].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            torch.testing.assert_close(out[s], want)
        start += n
    # uniform lengths take the batched path without reading cu_seqlens
    cu2 = torch.tensor([0, 7, 14, 21], dtype=torch.int32)
    torch.testing.assert_close(ref.varlen_attention(q, k, v, cu2, max_seqlen=7), ref.varlen_attention(q, k, v, cu2))


def test_saccade_reference_order_ties_and_nan():
    scores = torch.tensor([0.5, float("nan"), 0.9, 0.5, 0.1, 0.9])
    feats = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 3)
    k = torch.tensor([6])
    out, pos, cu = ref.saccade_gather(scores[None], feats[None], k)
    assert pos.tolist() == [2, 5, 0, 3, 4, 1]                  # desc score, lower index on ties, NaN last
    assert torch.equal(out[:, 0], pos.float()) and cu.tolist() == [0, 6]
    _, pos, _ = ref.saccade_gather(scores[None], feats[None], torch.tensor([3]), spatial_order=True)
    assert pos.tolist() == [0, 2, 5]


def _dense_prefix_lm(q, k, v, lengths, prefixes, cos=None, sin=None):
    """An independent oracle written the way DeepSeek-OCR 2's code runs it: per sequence, RoPE as
    transformers applies it, K/V repeated per query group, a dense [L, L] float mask filled with
    finfo.min and opened row by row, then SDPA."""
    out, start = torch.zeros_like(q), 0
    group = q.shape[1] // k.shape[1]
    for n, p in zip(lengths, prefixes):
        s = slice(start, start + n)
        start += n
        if n == 0:
            continue
        qi, ki, vi = (t[s].transpose(0, 1)[None] for t in (q, k, v))        # [1, heads, n, d]
        if cos is not None:
            c, si = cos[:n].to(q.dtype), sin[:n].to(q.dtype)
            half = q.shape[-1] // 2
            rot = lambda x: torch.cat([-x[..., half:], x[..., :half]], -1)  # noqa: E731
            qi, ki = qi * c + rot(qi) * si, ki * c + rot(ki) * si
        ki, vi = (t[:, :, None].expand(-1, -1, group, -1, -1).reshape(1, -1, n, t.shape[-1]) for t in (ki, vi))
        mask = torch.full((n, n), torch.finfo(q.dtype).min, dtype=q.dtype)
        if p is None:
            mask.zero_()
        else:
            mask[:p, :p] = 0
            for i in range(p, n):
                mask[i, : i + 1] = 0
        out[s] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (7, 1)])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("lengths,prefixes", [
    ([6, 6, 6], [3, 0, 6]),                     # equal lengths: the packed rows are the padded layout
    ([1, 9, 0, 16, 5], [1, 4, 0, 8, 0]),        # mixed, empty, length 1, prefix on/inside a boundary
    ([5, 12], [None, None]),                    # no prefix: bidirectional with key padding
])
def test_varlen_reference_prefix_lm_gqa_rope(heads, kv_heads, rope, lengths, prefixes):
    torch.manual_seed(0)
    total, d = sum(lengths), 8
    q = torch.randn(total, heads, d, dtype=torch.float64)
    k, v = (torch.randn(total, kv_heads, d, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    prefix = None if prefixes[0] is None else torch.tensor(prefixes, dtype=torch.int32)
    cos = sin = None
    if rope:
        cos, sin = ref.rope_tables(max(lengths), d, 1e6, torch.float64)
    got = ref.varlen_attention(q, k, v, cu, max(lengths), None, prefix_lens=prefix, rope_cos=cos, rope_sin=sin)
    want = _dense_prefix_lm(q, k, v, lengths, prefixes, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_varlen_reference_chunks_and_gradients():
    """Sequences split into several padded chunks give the same rows; gradients flow to q, k, v."""
    lengths, prefixes = [3, 7, 2, 7], [1, 7, 0, 4]
    cu = torch.tensor([0, 3, 10, 12, 19], dtype=torch.int32)
    q = torch.randn(19, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(19, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(19, 2, 8, dtype=torch.float64, requires_grad=True)
    prefix = torch.tensor(prefixes, dtype=torch.int32)
    old = ref.VARLEN_CHUNK_SCORES
    try:
        ref.VARLEN_CHUNK_SCORES = 4 * 7 * 7   # one sequence per chunk
        chunked = ref.varlen_attention(q, k, v, cu, 7, prefix_lens=prefix)
    finally:
        ref.VARLEN_CHUNK_SCORES = old
    whole = ref.varlen_attention(q, k, v, cu, 7, prefix_lens=prefix)
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(whole, _dense_prefix_lm(q.detach(), k.detach(), v.detach(), lengths, prefixes))
    assert torch.autograd.gradcheck(lambda a, b, c: ref.varlen_attention(a, b, c, cu, 7, prefix_lens=prefix), (q, k, v))


def test_rope_tables_match_transformers_formula():
    cos, sin = ref.rope_tables(512, 64, 1e6, torch.bfloat16)
    inv = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    freqs = (inv[None, :, None] @ torch.arange(512)[None, None, :].float()).transpose(1, 2)[0]   # transformers' matmul form
    emb = torch.cat([freqs, freqs], -1)
    assert torch.equal(cos, emb.cos().to(torch.bfloat16)) and torch.equal(sin, emb.sin().to(torch.bfloat16))
