"""The pieces every attention kernel here shares (inlined by Triton at each call site):
q against the SAM rel-pos tables kept on chip, the bias gather for one key tile, and one step of
the fp32 online softmax."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_of_program(num_m_tiles, num_heads):
    """(q tile, sequence, head) of this program. The grid is 1-D (CUDA's x axis takes 2^31 - 1
    programs; y and z stop at 65535, which serving-scale batches pass), with the q tiles of one
    (sequence, head) adjacent so they run together and share its keys and values in L2."""
    pid = tl.program_id(0)
    pid_m = pid % num_m_tiles
    seq_head = pid // num_m_tiles
    return pid_m, seq_head // num_heads, seq_head % num_heads


@triton.jit
def q_rel_pos_tables(q, table_h_ptr, table_w_ptr, rows_h_valid, rows_w_valid, d,
                     HEAD_DIM: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr, PRECISION: tl.constexpr):
    """``q @ table^T`` for both tables ([BLOCK_M, LP_*] fp32, unscaled q as upstream); table rows
    at or past ``rows_*_valid`` read as 0."""
    rows_h = tl.arange(0, LP_H)
    table_h = tl.load(table_h_ptr + rows_h[:, None] * HEAD_DIM + d[None, :], mask=(rows_h < rows_h_valid)[:, None], other=0.0)
    q_rh = tl.dot(q, tl.trans(table_h.to(q.dtype)), input_precision=PRECISION)
    rows_w = tl.arange(0, LP_W)
    table_w = tl.load(table_w_ptr + rows_w[:, None] * HEAD_DIM + d[None, :], mask=(rows_w < rows_w_valid)[:, None], other=0.0)
    q_rw = tl.dot(q, tl.trans(table_w.to(q.dtype)), input_precision=PRECISION)
    return q_rh, q_rw


@triton.jit
def rel_pos_bias_tile(q_rh, q_rw, qy, qx, ky, kx, valid_n, seq_h, seq_w, LP_H: tl.constexpr, LP_W: tl.constexpr):
    """``bias[i, j] = qRh[i, y_i - y_j + seq_h - 1] + qRw[i, x_i - x_j + seq_w - 1]`` for one key
    tile, gathered from the on-chip tables. Dead columns/rows index in range; the caller masks them."""
    idx_h = tl.where(valid_n[None, :], qy[:, None] - ky[None, :] + seq_h - 1, 0)
    idx_w = tl.where(valid_n[None, :], qx[:, None] - kx[None, :] + seq_w - 1, 0)
    idx_h = tl.minimum(tl.maximum(idx_h, 0), LP_H - 1)
    idx_w = tl.minimum(tl.maximum(idx_w, 0), LP_W - 1)
    return tl.gather(q_rh, idx_h, 1) + tl.gather(q_rw, idx_w, 1)


@triton.jit
def online_softmax_step(acc, m_i, l_i, q, k, v, bias, valid_n, qk_scale,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one key tile into (acc, running max, running sum); scores in log2 units, fp32."""
    return softmax_fold(acc, m_i, l_i, q, k, v, bias, valid_n[None, :], qk_scale, HAS_BIAS, True, PRECISION)


@triton.jit
def softmax_fold(acc, m_i, l_i, q, k, v, bias, allowed, qk_scale,
                 HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`online_softmax_step` with ``allowed`` broadcastable to [BLOCK_M, BLOCK_N] (a column
    mask, or a per-pair mask on a prefix-LM boundary tile); ``MASKED=False``: a tile every row sees
    whole (no select at all). Every row must see a key in some tile before its first fully masked
    one (true for prefix-LM: key 0 is visible to every row), else its running max stays -inf."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        s = s + bias * 1.4426950408889634  # LOG2E: the bias is added after scaling, in natural units
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return acc, m_new, l_i


# ---- GQA, prefix-LM and RoPE pieces (DeepEncoder V2's causal-flow stage) ------------------------


@triton.jit
def prefix_visible(pos, p):
    """Keys visible to rows at ``pos`` under a prefix-LM mask of prefix ``p``: ``j < max(p, i + 1)``
    (rows in the prefix see the prefix, later rows every key up to themselves)."""
    return tl.maximum(p, pos + 1)


@triton.jit
def load_rows(ptr, rows, stride_t, pos, valid, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
              HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr):
    """``[len(rows), HEAD_DIM]`` of one head (``ptr`` at the head's first channel; masked rows 0),
    with RoPE applied on load when ``HAS_ROPE``: ``x cos + rotate_half(x) sin`` at positions ``pos``
    (rotate-half = ``[-x2, x1]``, read as a second load at the swapped channels, an L1 hit). The
    tables are cast to x's dtype first and the result rounded to it once, as the tensor-core
    operand; transformers rounds each of its three steps in that dtype."""
    x = tl.load(ptr + rows[:, None] * stride_t + d[None, :], mask=valid[:, None], other=0.0)
    if HAS_ROPE:
        half: tl.constexpr = HEAD_DIM // 2
        swapped = tl.where(d < half, d + half, d - half)
        x_swap = tl.load(ptr + rows[:, None] * stride_t + swapped[None, :], mask=valid[:, None], other=0.0)
        cos = tl.load(cos_ptr + pos[:, None] * stride_cos + d[None, :], mask=valid[:, None], other=0.0)
        sin = tl.load(sin_ptr + pos[:, None] * stride_sin + d[None, :], mask=valid[:, None], other=0.0)
        cos = cos.to(x.dtype).to(tl.float32)
        sin = sin.to(x.dtype).to(tl.float32)
        sign = tl.where(d < half, -1.0, 1.0)
        x = (x.to(tl.float32) * cos + x_swap.to(tl.float32) * sign[None, :] * sin).to(x.dtype)
    return x


@triton.jit
def rotate_half_tile(x, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``[-x2, x1]`` of a register tile ``[ROWS, HEAD_DIM]`` (halves x1, x2), by reshape/split/join."""
    x3 = tl.permute(tl.reshape(x, [ROWS, 2, HEAD_DIM // 2]), [0, 2, 1])   # [ROWS, d/2, 2]: (x1, x2) pairs
    x1, x2 = tl.split(x3)
    return tl.reshape(tl.permute(tl.join(-x2, x1), [0, 2, 1]), [ROWS, HEAD_DIM])


@triton.jit
def rope_backward(g, pos, valid, d, cos_ptr, sin_ptr, stride_cos, stride_sin, dtype,
                  ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The gradient through ``x cos + rotate_half(x) sin`` (fp32 ``g`` of the rotated rows):
    ``g cos + rotate_half^T(g sin)``, with ``rotate_half^T = -rotate_half``; tables cast to the
    activations' ``dtype`` as in the forward."""
    cos = tl.load(cos_ptr + pos[:, None] * stride_cos + d[None, :], mask=valid[:, None], other=0.0)
    sin = tl.load(sin_ptr + pos[:, None] * stride_sin + d[None, :], mask=valid[:, None], other=0.0)
    cos = cos.to(dtype).to(tl.float32)
    sin = sin.to(dtype).to(tl.float32)
    return g * cos - rotate_half_tile(g * sin, ROWS, HEAD_DIM)


# ---- backward pieces (FA2-style: P recomputed from the saved row logsumexp) ---------------------


@triton.jit
def recompute_probs(q, k, bias, valid_n, lse2, qk_scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """P of one key tile from the forward's logsumexp (``lse2`` in log2 units). Dead rows carry
    ``lse2 = +inf`` and dead columns are masked, so both come out 0."""
    return recompute_probs_masked(q, k, bias, valid_n[None, :], lse2, qk_scale, HAS_BIAS, True, PRECISION)


@triton.jit
def recompute_probs_masked(q, k, bias, allowed, lse2, qk_scale, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
                           PRECISION: tl.constexpr):
    """:func:`recompute_probs` with ``allowed`` broadcastable to the tile (``MASKED=False``: no select)."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        s = s + bias * 1.4426950408889634  # LOG2E
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    return p


@triton.jit
def sum_by_key_coord(ds, key_coord, valid_n, LP: tl.constexpr, PRECISION: tl.constexpr):
    """``T[i, c] = sum over keys j with coordinate c of ds[i, j]`` ([BLOCK_M, LP]): the bias
    gradient grouped by key row (or column) as a dot with a one-hot matrix (exact 0/1 operands,
    tensor cores, no atomics)."""
    onehot = (key_coord[:, None] == tl.arange(0, LP)[None, :]) & valid_n[:, None]
    return tl.dot(ds, onehot.to(ds.dtype), input_precision=PRECISION)


@triton.jit
def rel_pos_table_grad(t, q_coord, side, r, LK: tl.constexpr):
    """``d(qR)[i, r]`` for the table rows ``r`` ([BLOCK_M, len(r)]) from ``T`` ([BLOCK_M, LK]) of
    :func:`sum_by_key_coord`: table row ``r = c_i - c_j + side - 1`` of query ``i`` gathers the keys
    at coordinate ``c_j = c_i + side - 1 - r``."""
    src = q_coord[:, None] + side - 1 - r[None, :]
    ok = (src >= 0) & (src < side)
    src = tl.minimum(tl.maximum(src, 0), LK - 1)
    return tl.where(ok, tl.gather(t, src, 1), 0.0)


@triton.jit
def through_rel_pos_table(dq, t, q, q_coord, side, table_ptr, dtable_ptr, d, LK: tl.constexpr, LP: tl.constexpr,
                          HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """The bias gradient of one q tile through one table: ``dq += d(qR) table`` and this program's
    partial ``d(table) = d(qR)^T q`` stored at ``dtable_ptr`` (``2 side - 1`` rows). Taken 64 table
    rows at a time so that long tables (Large's 159 rows) stay in registers."""
    CHUNK: tl.constexpr = 64 if LP > 64 else LP
    rows = 2 * side - 1
    for r0 in range(0, LP, CHUNK):   # a loop, not unrolled: one chunk live at a time
        r = r0 + tl.arange(0, CHUNK)
        d_qr = rel_pos_table_grad(t, q_coord, side, r, LK).to(q.dtype)
        table = tl.load(table_ptr + r[:, None] * HEAD_DIM + d[None, :], mask=(r < rows)[:, None], other=0.0)
        dq += tl.dot(d_qr, table.to(q.dtype), input_precision=PRECISION)
        dt = tl.dot(tl.trans(d_qr), q, input_precision=PRECISION)
        tl.store(dtable_ptr + r[:, None] * HEAD_DIM + d[None, :], dt, mask=(r < rows)[:, None])
    return dq
