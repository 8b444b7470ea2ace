"""Backward of the packed varlen attention (optionally with SAM's per-sequence rel-pos bias),
FA2-style: the forward keeps its output and each row's logsumexp (fp32 ``[total, heads]``); scores
are recomputed tile by tile, on the forward's 1-D grid of (tile, sequence, head) programs sized by
``max_seqlen`` (tiles past a sequence's end exit at once; no host sync). Each program owns what it
writes (no float atomics: deterministic):

- ``_dq_kernel`` (per q tile): ``dq``, ``delta = rowsum(dO * O)`` for the second kernel and, with
  the bias, ``d(qR)`` through the gather (``attention_core.sum_by_key_coord``) into ``dq`` and a
  per-program partial table gradient (the ops layer sums them per side in a fixed order);
- ``_dkv_kernel`` (per key tile of a kv head): ``dk``, ``dv``, summed over the kv head's query
  group (GQA) in one program, in a fixed order.

With the prefix-LM mask both kernels visit only the tiles a row can see (dq: key tiles up to the q
tile's bound; dkv: q tiles from the first row that sees the key tile), the per-pair mask only on
boundary tiles. With RoPE, q and k are rotated on load as in the forward and ``dq``/``dk`` leave
through the rotation's transpose (``attention_core.rope_backward``), so they are the gradients of
the unrotated inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import launch_grid
from .attention_core import (load_rows, prefix_visible, q_rel_pos_tables, recompute_probs_masked, rel_pos_bias_tile, rope_backward,
                             sum_by_key_coord, through_rel_pos_table, tile_of_program)
from .configs import varlen_attention_bwd_config
from .varlen_attention import prefix_of, sequence_grid


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr,
    grid_hw_ptr, tables_h_ptr, tables_w_ptr, table_rows_ptr, dtable_h_ptr, dtable_w_ptr,   # HAS_BIAS only
    prefix_ptr, cos_ptr, sin_ptr,   # HAS_PREFIX / HAS_ROPE only
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,   # out, dout, dq: contiguous [total, heads, d]
    stride_cos, stride_sin,
    num_heads, num_m_tiles, program_offset, sm_scale,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
    LK_H: tl.constexpr, LK_W: tl.constexpr,
    HAS_PREFIX: tl.constexpr = False, HAS_ROPE: tl.constexpr = False,
    GROUP: tl.constexpr = 1,   # query heads per kv head (GQA; 1 = MHA)
):
    # with the bias the launcher runs the programs in slices, program_offset apart (bounded partials)
    pid = tl.program_id(0) + program_offset
    pid_m = pid % num_m_tiles
    seq = pid // num_m_tiles // num_heads
    head = pid // num_m_tiles % num_heads
    start = tl.load(cu_seqlens_ptr + seq)
    n = tl.load(cu_seqlens_ptr + seq + 1) - start
    if pid_m * BLOCK_M >= n:
        return
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"
    d = tl.arange(0, HEAD_DIM)
    kv_head = head // GROUP
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < n
    rows_m = (start + offs_m).to(tl.int64)
    q = load_rows(q_ptr + head * stride_qh, rows_m, stride_qt, offs_m, valid_m, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
                  HEAD_DIM, HAS_ROPE)
    o_offs = (rows_m * num_heads + head) * HEAD_DIM
    o = tl.load(out_ptr + o_offs[:, None] + d[None, :], mask=valid_m[:, None], other=0.0)
    do = tl.load(dout_ptr + o_offs[:, None] + d[None, :], mask=valid_m[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + rows_m * num_heads + head, delta, mask=valid_m)
    lse2 = tl.load(lse_ptr + rows_m * num_heads + head, mask=valid_m, other=float("inf")) * 1.4426950408889634
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if HAS_BIAS:
        seq_h, seq_w, first_h, first_w = sequence_grid(grid_hw_ptr, table_rows_ptr, seq)
        qy = offs_m // seq_w
        qx = offs_m % seq_w
        q_rh, q_rw = q_rel_pos_tables(q, tables_h_ptr + first_h * HEAD_DIM, tables_w_ptr + first_w * HEAD_DIM,
                                      2 * seq_h - 1, 2 * seq_w - 1, d, HEAD_DIM, LP_H, LP_W, precision)
        t_h = tl.zeros([BLOCK_M, LK_H], dtype=tl.float32)
        t_w = tl.zeros([BLOCK_M, LK_W], dtype=tl.float32)
    else:   # placeholders, never read
        seq_h, seq_w, qy, qx, q_rh, q_rw, t_h, t_w = 1, 1, 0, 0, 0.0, 0.0, 0.0, 0.0
    qk_scale = sm_scale * 1.4426950408889634

    # prefix-LM: row i sees keys j < max(p, i + 1); tiles past the tile's largest bound are
    # skipped, those below its smallest bound need no mask (as in the forward)
    p = prefix_of(prefix_ptr, seq, n, HAS_PREFIX)
    visible = prefix_visible(offs_m, p)
    if HAS_PREFIX:
        whole_end = prefix_visible(pid_m * BLOCK_M, p) // BLOCK_N * BLOCK_N
        key_end = tl.maximum(p, tl.minimum(n, (pid_m + 1) * BLOCK_M))
    else:
        whole_end = 0
        key_end = n
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, whole_end, BLOCK_N):
        dq, t_h, t_w = _dq_key_tile(dq, t_h, t_w, q, do, delta, lse2, k_head, v_head, start, start_n, n, visible,
                                    stride_kt, stride_vt, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
                                    q_rh, q_rw, qy, qx, seq_h, seq_w, qk_scale, HEAD_DIM, HAS_BIAS, 0, HAS_ROPE,
                                    BLOCK_N, LP_H, LP_W, LK_H, LK_W, precision)
    for start_n in range(whole_end, key_end, BLOCK_N):
        dq, t_h, t_w = _dq_key_tile(dq, t_h, t_w, q, do, delta, lse2, k_head, v_head, start, start_n, n, visible,
                                    stride_kt, stride_vt, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
                                    q_rh, q_rw, qy, qx, seq_h, seq_w, qk_scale, HEAD_DIM, HAS_BIAS, 2 if HAS_PREFIX else 1,
                                    HAS_ROPE,
                                    BLOCK_N, LP_H, LP_W, LK_H, LK_W, precision)
    dq = dq * sm_scale
    if HAS_BIAS:
        pid = tl.program_id(0).to(tl.int64)   # the partial's slot within this launch
        dq = through_rel_pos_table(dq, t_h, q, qy, seq_h, tables_h_ptr + first_h * HEAD_DIM, dtable_h_ptr + pid * LP_H * HEAD_DIM,
                                   d, LK_H, LP_H, HEAD_DIM, precision)
        dq = through_rel_pos_table(dq, t_w, q, qx, seq_w, tables_w_ptr + first_w * HEAD_DIM, dtable_w_ptr + pid * LP_W * HEAD_DIM,
                                   d, LK_W, LP_W, HEAD_DIM, precision)
    if HAS_ROPE:   # dq so far is the gradient of the rotated q
        dq = rope_backward(dq, offs_m, valid_m, d, cos_ptr, sin_ptr, stride_cos, stride_sin, dq_ptr.dtype.element_ty,
                           BLOCK_M, HEAD_DIM)
    tl.store(dq_ptr + o_offs[:, None] + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=valid_m[:, None])


@triton.jit
def _dq_key_tile(dq, t_h, t_w, q, do, delta, lse2, k_head, v_head, start, start_n, n, visible, stride_kt, stride_vt, d,
                 cos_ptr, sin_ptr, stride_cos, stride_sin, q_rh, q_rw, qy, qx, seq_h, seq_w, qk_scale,
                 HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, MASK: tl.constexpr, HAS_ROPE: tl.constexpr,
                 BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr, LK_H: tl.constexpr, LK_W: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One key tile of the dq program: ``dq += dS k`` (and the bias gradient sums). ``MASK``: 0 for
    a tile every row sees whole, 1 to mask the columns past the sequence, 2 for the prefix-LM
    per-pair mask (which includes them)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid_n = offs_n < n
    rows_n = (start + offs_n).to(tl.int64)
    k = load_rows(k_head, rows_n, stride_kt, offs_n, valid_n, d, cos_ptr, sin_ptr, stride_cos, stride_sin, HEAD_DIM, HAS_ROPE)
    v = tl.load(v_head + rows_n[:, None] * stride_vt + d[None, :], mask=valid_n[:, None], other=0.0)
    if HAS_BIAS:
        ky = offs_n // seq_w
        kx = offs_n % seq_w
        bias = rel_pos_bias_tile(q_rh, q_rw, qy, qx, ky, kx, valid_n, seq_h, seq_w, LP_H, LP_W)
    else:
        bias = 0.0
    if MASK == 2:
        allowed = (offs_n[None, :] < visible[:, None]) & valid_n[None, :]
    else:
        allowed = valid_n[None, :]
    p = recompute_probs_masked(q, k, bias, allowed, lse2, qk_scale, HAS_BIAS, MASK > 0, PRECISION)
    dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dq += tl.dot(ds, k.to(q.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        t_h += sum_by_key_coord(ds, ky, valid_n, LK_H, PRECISION)
        t_w += sum_by_key_coord(ds, kx, valid_n, LK_W, PRECISION)
    return dq, t_h, t_w


@triton.jit
def _varlen_attention_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
    grid_hw_ptr, tables_h_ptr, tables_w_ptr, table_rows_ptr,
    prefix_ptr, cos_ptr, sin_ptr,   # HAS_PREFIX / HAS_ROPE only
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,   # dout: contiguous [total, heads, d]; dk, dv: [total, kv_heads, d]
    stride_cos, stride_sin,
    num_heads, num_n_tiles, sm_scale,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
    HAS_PREFIX: tl.constexpr = False, HAS_ROPE: tl.constexpr = False,
    GROUP: tl.constexpr = 1,   # query heads per kv head (GQA; 1 = MHA)
):
    # one program per (key tile, sequence, kv head): it sums dk/dv over the kv head's query group
    # in a fixed order (GQA without atomics, deterministic)
    num_kv_heads = num_heads // GROUP
    pid_n, seq, kv_head = tile_of_program(num_n_tiles, num_kv_heads)
    start = tl.load(cu_seqlens_ptr + seq)
    n = tl.load(cu_seqlens_ptr + seq + 1) - start
    if pid_n * BLOCK_N >= n:
        return
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"
    d = tl.arange(0, HEAD_DIM)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < n
    rows_n = (start + offs_n).to(tl.int64)
    k = load_rows(k_ptr + kv_head * stride_kh, rows_n, stride_kt, offs_n, valid_n, d, cos_ptr, sin_ptr, stride_cos, stride_sin,
                  HEAD_DIM, HAS_ROPE)
    v = tl.load(v_ptr + kv_head * stride_vh + rows_n[:, None] * stride_vt + d[None, :], mask=valid_n[:, None], other=0.0)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_BIAS:
        seq_h, seq_w, first_h, first_w = sequence_grid(grid_hw_ptr, table_rows_ptr, seq)
        ky = offs_n // seq_w
        kx = offs_n % seq_w
    else:   # placeholders, never read
        seq_h, seq_w, first_h, first_w, ky, kx = 1, 1, 0, 0, 0, 0
    qk_scale = sm_scale * 1.4426950408889634

    # prefix-LM: key j is seen by rows i with j < max(p, i + 1): every row when j < p, else rows
    # i >= j. Rows below the tile's first key past the prefix skip it; rows from its last key on
    # (or every row, for a tile inside the prefix) see it whole.
    p = prefix_of(prefix_ptr, seq, n, HAS_PREFIX)
    if HAS_PREFIX:
        first_row = tl.where(pid_n * BLOCK_N < p, 0, pid_n * BLOCK_N // BLOCK_M * BLOCK_M)
        whole_from = tl.where((pid_n + 1) * BLOCK_N <= p, 0, tl.minimum(n, pid_n * BLOCK_N + BLOCK_N - 1))
        mask_end = tl.maximum(first_row + tl.cdiv(whole_from - first_row, BLOCK_M) * BLOCK_M, first_row)
    else:
        first_row = 0
        mask_end = 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(0, GROUP):   # a constant trip count: folded away without GQA
        head = kv_head * GROUP + g
        for start_m in range(first_row, mask_end, BLOCK_M):
            dk, dv = _dkv_query_tile(dk, dv, k, v, offs_n, valid_n, q_ptr + head * stride_qh, dout_ptr, lse_ptr, delta_ptr,
                                     start, start_m, n, p, head, num_heads, stride_qt, d, cos_ptr, sin_ptr, stride_cos,
                                     stride_sin, tables_h_ptr + first_h * HEAD_DIM, tables_w_ptr + first_w * HEAD_DIM,
                                     ky, kx, seq_h, seq_w, qk_scale, HEAD_DIM, HAS_BIAS, True, HAS_ROPE, UPCAST_DOT,
                                     BLOCK_M, LP_H, LP_W, precision)
        for start_m in range(mask_end, n, BLOCK_M):
            dk, dv = _dkv_query_tile(dk, dv, k, v, offs_n, valid_n, q_ptr + head * stride_qh, dout_ptr, lse_ptr, delta_ptr,
                                     start, start_m, n, p, head, num_heads, stride_qt, d, cos_ptr, sin_ptr, stride_cos,
                                     stride_sin, tables_h_ptr + first_h * HEAD_DIM, tables_w_ptr + first_w * HEAD_DIM,
                                     ky, kx, seq_h, seq_w, qk_scale, HEAD_DIM, HAS_BIAS, False, HAS_ROPE, UPCAST_DOT,
                                     BLOCK_M, LP_H, LP_W, precision)
    dk = dk * sm_scale
    if HAS_ROPE:   # dk so far is the gradient of the rotated k
        dk = rope_backward(dk, offs_n, valid_n, d, cos_ptr, sin_ptr, stride_cos, stride_sin, dk_ptr.dtype.element_ty,
                           BLOCK_N, HEAD_DIM)
    offs = ((rows_n * num_kv_heads + kv_head) * HEAD_DIM)[:, None] + d[None, :]
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=valid_n[:, None])
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=valid_n[:, None])


@triton.jit
def _dkv_query_tile(dk, dv, k, v, offs_n, valid_n, q_head, dout_ptr, lse_ptr, delta_ptr, start, start_m, n, p, head, num_heads,
                    stride_qt, d, cos_ptr, sin_ptr, stride_cos, stride_sin, table_h_ptr, table_w_ptr, ky, kx, seq_h, seq_w,
                    qk_scale, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, PREFIX_MASK: tl.constexpr,
                    HAS_ROPE: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, LP_H: tl.constexpr,
                    LP_W: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile of one query head against the dkv program's key tile: ``dv += P^T dO``,
    ``dk += dS^T q``. Dead rows carry ``lse = +inf`` (P = 0); ``PREFIX_MASK``: the per-pair mask."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    valid_m = offs_m < n
    rows_m = (start + offs_m).to(tl.int64)
    q = load_rows(q_head, rows_m, stride_qt, offs_m, valid_m, d, cos_ptr, sin_ptr, stride_cos, stride_sin, HEAD_DIM, HAS_ROPE)
    do = tl.load(dout_ptr + ((rows_m * num_heads + head) * HEAD_DIM)[:, None] + d[None, :], mask=valid_m[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + rows_m * num_heads + head, mask=valid_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + rows_m * num_heads + head, mask=valid_m, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if HAS_BIAS:
        q_rh, q_rw = q_rel_pos_tables(q, table_h_ptr, table_w_ptr, 2 * seq_h - 1, 2 * seq_w - 1, d, HEAD_DIM, LP_H, LP_W,
                                      PRECISION)
        bias = rel_pos_bias_tile(q_rh, q_rw, offs_m // seq_w, offs_m % seq_w, ky, kx, valid_n, seq_h, seq_w, LP_H, LP_W)
    else:
        bias = 0.0
    if PREFIX_MASK:
        allowed = (offs_n[None, :] < prefix_visible(offs_m, p)[:, None]) & valid_n[None, :]
    else:
        allowed = valid_n[None, :]
    pr = recompute_probs_masked(q, k, bias, allowed, lse2, qk_scale, HAS_BIAS, True, PRECISION)
    dv += tl.dot(tl.trans(pr.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=PRECISION)
    ds = (pr * (dp - delta[:, None])).to(q.dtype)
    dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    return dk, dv


def kernels_for(interpret: bool):
    from ._runtime import check_mode

    return check_mode(_varlen_attention_bwd_dq_kernel, interpret), check_mode(_varlen_attention_bwd_dkv_kernel, interpret)


def varlen_bwd_grids(num_seqs: int, heads: int, max_seqlen: int, dq_cfg: dict, dkv_cfg: dict, kv_heads: int | None = None):
    """(q tiles, key tiles per sequence, dq grid, dkv grid) from host ints alone; the dkv programs
    run per kv head (each sums its query group)."""
    m, n = triton.cdiv(max_seqlen, dq_cfg["BLOCK_M"]), triton.cdiv(max_seqlen, dkv_cfg["BLOCK_N"])
    return m, n, launch_grid(m * num_seqs * heads), launch_grid(n * num_seqs * (kv_heads or heads))


# dq programs per launch with the bias (their table partials are bounded by it; see the SAM backward)
DQ_PROGRAMS = 1024


def varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, bias_tables=None,
                         interpret: bool = False, reduce_parts=None, prefix_lens=None, rope=None):
    """``(dq [total, heads, d], dk, dv [total, kv_heads, d])``, contiguous; ``prefix_lens`` and
    ``rope`` as the forward took them. With ``bias_tables`` (as the forward took them) the dq
    programs run in slices of at most ``DQ_PROGRAMS``; after each, ``reduce_parts(parts_h, parts_w,
    first_program)`` takes that slice's per-program partial table gradients (fp32 ``[n, LP, d]``;
    program ``p`` is (q tile, sequence, head) ``p`` of the 1-D grid, zeros where it had no rows)."""
    total, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    num_seqs = cu_seqlens.shape[0] - 1
    has_bias = bias_tables is not None
    max_h, max_w = (bias_tables[4], bias_tables[5]) if has_bias else (1, 1)
    dq_cfg, dkv_cfg = varlen_attention_bwd_config(has_bias, max_h, max_w, prefix=prefix_lens is not None)
    dq = torch.empty(total, heads, head_dim, device=q.device, dtype=q.dtype)
    dk, dv = (torch.empty(total, kv_heads, head_dim, device=q.device, dtype=q.dtype) for _ in range(2))
    m_tiles, n_tiles, dq_grid, dkv_grid = varlen_bwd_grids(max(num_seqs, 0), heads, max(max_seqlen, 1), dq_cfg, dkv_cfg, kv_heads)
    if total == 0 or max_seqlen == 0 or num_seqs == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    programs = dq_grid[0]
    slice_size = min(programs, DQ_PROGRAMS) if has_bias else programs
    parts = None
    if has_bias:
        parts = tuple(torch.empty(slice_size, lp, head_dim, device=q.device, dtype=torch.float32)
                      for lp in (dq_cfg["LP_H"], dq_cfg["LP_W"]))
    dout, out = dout.contiguous(), out.contiguous()
    if has_bias:
        grid_hw, tables_h, tables_w, table_rows = (t.contiguous() for t in bias_tables[:4])
        tables_h, tables_w = tables_h.to(q.dtype), tables_w.to(q.dtype)
        dparts = parts
    else:
        grid_hw = tables_h = tables_w = table_rows = cu_seqlens   # never read
        dparts = (lse, lse)
    prefix = prefix_lens if prefix_lens is not None else cu_seqlens   # never read without the mask
    cos, sin = rope if rope is not None else (cu_seqlens, cu_seqlens)
    rope_strides = (cos.stride(0), sin.stride(0)) if rope is not None else (0, 0)
    delta = torch.empty_like(lse)
    upcast = interpret and q.dtype == torch.bfloat16
    common = dict(HEAD_DIM=head_dim, HAS_BIAS=has_bias, IEEE_DOT=q.dtype == torch.float32 or upcast, UPCAST_DOT=upcast,
                  HAS_PREFIX=prefix_lens is not None, HAS_ROPE=rope is not None, GROUP=heads // kv_heads)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *rope_strides)
    dq_kernel, dkv_kernel = kernels_for(interpret)
    for offset in range(0, programs, slice_size):   # slices fixed by shapes
        n = min(slice_size, programs - offset)
        if has_bias:
            for part in parts:
                part[:n].zero_()   # programs past their sequence's end write nothing
        dq_kernel[launch_grid(n)](q, k, v, out, dout, lse, delta, dq, cu_seqlens, grid_hw, tables_h, tables_w, table_rows,
                                  *dparts, prefix, cos, sin, *strides, heads, m_tiles, offset, scale, **common, **dq_cfg)
        if has_bias:
            reduce_parts(parts[0][:n], parts[1][:n], offset)
    dkv_kernel[dkv_grid](q, k, v, dout, lse, delta, dk, dv, cu_seqlens, grid_hw, tables_h, tables_w, table_rows,
                         prefix, cos, sin, *strides, heads, n_tiles, scale, **common, **dkv_cfg)
    return dq, dk, dv
