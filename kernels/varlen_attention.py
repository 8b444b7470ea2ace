"""Attention over packed variable-length sequences (forward), optionally with SAM's decomposed
rel-pos bias per sequence.

One program = one (q tile, sequence, head), on a 1-D grid of ``cdiv(max_seqlen, BLOCK_M) x
num_seqs x heads`` programs: it needs ``max_seqlen`` (a host int the caller already has), never the
lengths, so there is no device sync and no recompilation when the lengths change; q tiles past a
sequence's end exit at once. q/k/v are read through strides, so they can be views of a packed qkv
projection (``[total, 3, heads, d]``) with no copy.

With a bias, each sequence carries its grid ``h x w`` (row-major tokens) and the row offsets of its
resized tables inside one concatenated table per axis; the bias itself is built tile by tile on
chip from ``q @ table^T`` (``attention_core``), as in the SAM kernel.

DeepEncoder V2's causal flow adds three things, each a constexpr switch (the other paths compile as
before):
- GQA (``GROUP`` query heads per kv head): query head ``h`` reads kv head ``h // GROUP`` in place
  (transformers' ``repeat_kv`` order); a group's programs are adjacent, so its K/V stay in L2.
- prefix-LM (``HAS_PREFIX``, ``prefix_lens[seq] = p``): row ``i`` sees keys ``j < max(p, i + 1)``.
  A q tile loads key tiles up to ``max(p, min(n, tile end))`` only (the rest are skipped, never
  loaded); tiles below its rows' smallest bound ``max(p, tile start + 1)`` run with no mask, and
  only the tiles in between take the per-pair mask.
- RoPE on load (``HAS_ROPE``): q and each k tile are rotated as they are read (rotate-half, the
  position is the row's index within its sequence, cos/sin tables cast to q's dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import launch_grid
from .attention_core import (load_rows, online_softmax_step, prefix_visible, q_rel_pos_tables, rel_pos_bias_tile, softmax_fold,
                             tile_of_program)
from .configs import varlen_attention_config


@triton.jit
def sequence_grid(grid_hw_ptr, table_rows_ptr, seq):
    """A sequence's grid (rows, cols) and the first rows of its resized tables within the
    concatenated ones (rel-pos bias only)."""
    return (tl.load(grid_hw_ptr + 2 * seq), tl.load(grid_hw_ptr + 2 * seq + 1),
            tl.load(table_rows_ptr + 2 * seq).to(tl.int64), tl.load(table_rows_ptr + 2 * seq + 1).to(tl.int64))


@triton.jit
def prefix_of(prefix_ptr, seq, n, HAS_PREFIX: tl.constexpr):
    """The sequence's prefix length, clamped to [0, n] (an unchecked value must not widen the key
    range past the sequence); ``n`` (bidirectional) without a prefix-LM mask."""
    if HAS_PREFIX:
        return tl.minimum(tl.maximum(tl.load(prefix_ptr + seq), 0), n)
    else:
        return n


@triton.jit
def _varlen_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr,
    lse_ptr,                    # fp32 [total, heads] (natural log), written only when STORE_LSE
    grid_hw_ptr, tables_h_ptr, tables_w_ptr, table_rows_ptr,   # used only when HAS_BIAS
    prefix_ptr, cos_ptr, sin_ptr,   # used only when HAS_PREFIX / HAS_ROPE
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cos, stride_sin,
    num_heads, num_m_tiles, sm_scale,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,     # fp32 dot operands: full precision instead of tf32
    UPCAST_DOT: tl.constexpr,   # dot in fp32 (Triton 3.9's interpreter gets bf16 tl.dot wrong)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
    STORE_LSE: tl.constexpr = False,   # training: keep each row's logsumexp for the backward
    HAS_PREFIX: tl.constexpr = False,  # prefix-LM mask from prefix_lens (tiles past a row's keys skipped)
    HAS_ROPE: tl.constexpr = False,    # RoPE on the loads of q and k
    GROUP: tl.constexpr = 1,           # query heads per kv head (GQA; 1 = MHA): a constant divisor
):
    pid_m, seq, head = tile_of_program(num_m_tiles, num_heads)
    start = tl.load(cu_seqlens_ptr + seq)
    n = tl.load(cu_seqlens_ptr + seq + 1) - start
    if pid_m * BLOCK_M >= n:
        return
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"
    d = tl.arange(0, HEAD_DIM)
    kv_head = head // GROUP   # transformers' repeat_kv order: K/V read in place, never repeated
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < n
    rows_m = (start + offs_m).to(tl.int64)   # packed rows can pass 2^31 elements in big batches
    q = load_rows(q_ptr + head * stride_qh, rows_m, stride_qt, offs_m, valid_m, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
                  HEAD_DIM, HAS_ROPE)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    if HAS_BIAS:
        seq_h, seq_w, first_h, first_w = sequence_grid(grid_hw_ptr, table_rows_ptr, seq)
        qy = offs_m // seq_w
        qx = offs_m % seq_w
        q_rh, q_rw = q_rel_pos_tables(q, tables_h_ptr + first_h * HEAD_DIM, tables_w_ptr + first_w * HEAD_DIM,
                                      2 * seq_h - 1, 2 * seq_w - 1, d, HEAD_DIM, LP_H, LP_W, precision)
    else:   # placeholders, never read
        seq_h, seq_w, qy, qx, q_rh, q_rw = 1, 1, 0, 0, 0.0, 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634   # LOG2E
    if HAS_PREFIX:
        # Row i sees keys j < max(p, i + 1): key tiles below the tile's smallest bound are whole for
        # every row (no mask), tiles up to its largest bound take the per-pair mask, and the rest
        # are never loaded (37.5% of V2's scores).
        p = prefix_of(prefix_ptr, seq, n, HAS_PREFIX)
        whole_end = prefix_visible(pid_m * BLOCK_M, p) // BLOCK_N * BLOCK_N
        key_end = tl.maximum(p, tl.minimum(n, (pid_m + 1) * BLOCK_M))
        visible = prefix_visible(offs_m, p)
        for start_n in range(0, whole_end, BLOCK_N):
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_head, v_head, start, start_n, n, visible, stride_kt, stride_vt, d,
                                      cos_ptr, sin_ptr, stride_cos, stride_sin, q_rh, q_rw, qy, qx,
                                      seq_h, seq_w, qk_scale,
                                      HEAD_DIM, HAS_BIAS, False, HAS_ROPE, UPCAST_DOT, BLOCK_N, LP_H, LP_W, precision)
        for start_n in range(whole_end, key_end, BLOCK_N):
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_head, v_head, start, start_n, n, visible, stride_kt, stride_vt, d,
                                      cos_ptr, sin_ptr, stride_cos, stride_sin, q_rh, q_rw, qy, qx,
                                      seq_h, seq_w, qk_scale,
                                      HEAD_DIM, HAS_BIAS, True, HAS_ROPE, UPCAST_DOT, BLOCK_N, LP_H, LP_W, precision)
    else:
        for start_n in range(0, n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid_n = offs_n < n
            rows_n = (start + offs_n).to(tl.int64)
            k = load_rows(k_head, rows_n, stride_kt, offs_n, valid_n, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
                          HEAD_DIM, HAS_ROPE)
            v = tl.load(v_head + rows_n[:, None] * stride_vt + d[None, :], mask=valid_n[:, None], other=0.0)
            if HAS_BIAS:
                bias = rel_pos_bias_tile(q_rh, q_rw, qy, qx, offs_n // seq_w, offs_n % seq_w, valid_n, seq_h, seq_w, LP_H, LP_W)
            else:
                bias = 0.0
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, bias, valid_n, qk_scale, HAS_BIAS, precision)

    out = acc / l_i[:, None]
    tl.store(out_ptr + rows_m[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None])
    if STORE_LSE:
        tl.store(lse_ptr + rows_m * num_heads + head, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=valid_m)


@triton.jit
def _key_tile(acc, m_i, l_i, q, k_head, v_head, start, start_n, n, visible, stride_kt, stride_vt, d,
              cos_ptr, sin_ptr, stride_cos, stride_sin, q_rh, q_rw, qy, qx, seq_h, seq_w, qk_scale,
              HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, HAS_ROPE: tl.constexpr,
              UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
              PRECISION: tl.constexpr):
    """One key tile of the prefix-LM forward: whole (``MASKED=False``: every key below the
    sequence's end and visible to every row) or a boundary tile under the per-pair mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid_n = offs_n < n
    rows_n = (start + offs_n).to(tl.int64)
    k = load_rows(k_head, rows_n, stride_kt, offs_n, valid_n, d, cos_ptr, sin_ptr, stride_cos, stride_sin, HEAD_DIM, HAS_ROPE)
    v = tl.load(v_head + rows_n[:, None] * stride_vt + d[None, :], mask=valid_n[:, None], other=0.0)
    if HAS_BIAS:
        bias = rel_pos_bias_tile(q_rh, q_rw, qy, qx, offs_n // seq_w, offs_n % seq_w, valid_n, seq_h, seq_w, LP_H, LP_W)
    else:
        bias = 0.0
    allowed = (offs_n[None, :] < visible[:, None]) & valid_n[None, :]
    return softmax_fold(acc, m_i, l_i, q, k, v, bias, allowed, qk_scale, HAS_BIAS, MASKED, PRECISION)


def kernel_for(interpret: bool):
    from ._runtime import check_mode

    return check_mode(_varlen_attention_fwd_kernel, interpret)


def varlen_grid(num_seqs: int, heads: int, max_seqlen: int, cfg: dict):
    """(q tiles per sequence, launch grid): from host ints alone, so shape tests need no launch."""
    num_m_tiles = triton.cdiv(max_seqlen, cfg["BLOCK_M"])
    return num_m_tiles, launch_grid(num_m_tiles * num_seqs * heads)


def varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float, bias_tables=None, interpret: bool = False,
                         with_lse: bool = False, prefix_lens=None, rope=None):
    """Launch on validated inputs. ``k``, ``v``: ``[total, kv_heads, d]`` (GQA when fewer heads than
    q). ``bias_tables``: None, or ``(grid_hw int32 [S, 2], tables_h, tables_w, table_rows int32
    [S, 2], max_side_h, max_side_w)`` from the ops layer. ``prefix_lens``: None or int32 ``[S]``
    (prefix-LM mask). ``rope``: None or ``(cos, sin)``, ``[>= max_seqlen, d]`` with unit last
    stride. ``with_lse``: return ``(out, lse)``, the fp32 ``[total, heads]`` row logsumexp the
    backward needs."""
    total, heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(total, heads, device=q.device, dtype=torch.float32) if with_lse else out
    num_seqs = cu_seqlens.shape[0] - 1
    has_bias = bias_tables is not None
    max_h, max_w = (bias_tables[4], bias_tables[5]) if has_bias else (1, 1)
    cfg = varlen_attention_config(has_bias, max_h, max_w, q.device, prefix=prefix_lens is not None)   # the device's tuned config, if any
    if total == 0 or max_seqlen == 0 or num_seqs == 0:
        return (out, lse) if with_lse else out
    if has_bias:
        grid_hw, tables_h, tables_w, table_rows = (t.contiguous() for t in bias_tables[:4])
        tables_h, tables_w = tables_h.to(q.dtype), tables_w.to(q.dtype)
    else:
        grid_hw = tables_h = tables_w = table_rows = cu_seqlens  # never read
    prefix = prefix_lens if prefix_lens is not None else cu_seqlens   # never read without the mask
    cos, sin = rope if rope is not None else (cu_seqlens, cu_seqlens)
    stride_cos, stride_sin = (cos.stride(0), sin.stride(0)) if rope is not None else (0, 0)
    upcast = interpret and q.dtype == torch.bfloat16  # exact: bf16 products fit fp32
    num_m_tiles, grid = varlen_grid(num_seqs, heads, max_seqlen, cfg)
    kernel_for(interpret)[grid](
        q, k, v, out, cu_seqlens, lse, grid_hw, tables_h, tables_w, table_rows, prefix, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        stride_cos, stride_sin, heads, num_m_tiles, scale,
        HEAD_DIM=head_dim, HAS_BIAS=has_bias, IEEE_DOT=q.dtype == torch.float32 or upcast, UPCAST_DOT=upcast,
        STORE_LSE=with_lse, HAS_PREFIX=prefix_lens is not None, HAS_ROPE=rope is not None, GROUP=heads // k.shape[1], **cfg,
    )
    return (out, lse) if with_lse else out
