"""Backward of the fused SAM rel-pos attention (windowed or global), FA2-style.

The forward keeps only its output and each real row's logsumexp (fp32, ``[B, heads, H, W]``); both
kernels here recompute the scores tile by tile (q.R tables on chip, as in the forward), so nothing
of size ``N x N`` ever exists. Two kernels, each owning what it writes (no float atomics, so the
result is deterministic):

- ``_dq_kernel``, one program per (q tile, sequence, head), loops over key tiles: ``dq`` and the
  bias gradient. ``dS`` reduces through the bias gather: ``T_h[i, y'] = sum over keys in row y' of
  dS[i, j]`` (a dot with a one-hot matrix), then ``d(qRh)[i, r] = T_h[i, y_i + S_h - 1 - r]`` (a
  gather), likewise for w. Then ``dq += d(qRh) table_h + d(qRw) table_w`` and each program writes
  its ``d(qR)^T q`` as a partial table gradient; the caller sums the partials in a fixed order.
  It also writes ``delta = rowsum(dO * O)`` for the second kernel.
- ``_dkv_kernel``, one program per (key tile, sequence, head), loops over q tiles: ``dk``, ``dv``.
  Window-padding keys (k/v = the qkv bias) write their rows' sums as per-program partials of
  ``d(pad_kv)``; padded queries are cropped from the output, so they get no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import launch_grid
from .attention_core import (q_rel_pos_tables, recompute_probs, rel_pos_bias_tile, sum_by_key_coord, through_rel_pos_table,
                             tile_of_program)
from .configs import rel_pos_attention_bwd_config
from .rel_pos_attention import _key_value_tile, _sequence_tokens, pad_key_value


@triton.jit
def _sequence_origin(seq, SEQ_H, SEQ_W, windows_w, windows_per_image, WINDOWED: tl.constexpr):
    """(image, grid row, grid col) of a sequence's first token."""
    if WINDOWED:
        win = seq % windows_per_image
        return seq // windows_per_image, (win // windows_w) * SEQ_H, (win % windows_w) * SEQ_W
    return seq, 0, 0


@triton.jit
def _rel_pos_attention_bwd_dq_kernel(
    qkv_ptr, table_h_ptr, table_w_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    dtable_h_ptr, dtable_w_ptr,     # fp32 partials [programs, 2 S - 1, d]
    pad_ptr,
    stride_qb, stride_qh, stride_qw,
    stride_ob, stride_oh, stride_ow,    # out and dout (same layout)
    stride_gb, stride_gh, stride_gw,    # dqkv
    H, W, SEQ_H, SEQ_W, windows_w, windows_per_image,
    num_heads, num_m_tiles, program_offset, sm_scale,
    C: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOWED: tl.constexpr, HAS_PAD: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
    LK_H: tl.constexpr, LK_W: tl.constexpr,     # key rows / columns of a sequence, padded to a power of two
):
    # the launcher runs the (q tile, sequence, head) programs in slices of at most DQ_PROGRAMS,
    # program_offset apart, so the per-program table partials stay bounded at any batch
    pid = tl.program_id(0) + program_offset
    pid_m = pid % num_m_tiles
    seq = pid // num_m_tiles // num_heads
    head = pid // num_m_tiles % num_heads
    b, origin_y, origin_x = _sequence_origin(seq, SEQ_H, SEQ_W, windows_w, windows_per_image, WINDOWED)
    n_tokens = SEQ_H * SEQ_W
    d = tl.arange(0, HEAD_DIM)
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"

    # ---- this q tile; only real rows matter (padded queries are cropped, so dO = 0 there) ------
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ty, tx, gy, gx, in_seq_m, real_m = _sequence_tokens(offs_m, SEQ_W, n_tokens, origin_y, origin_x, H, W)
    qkv_img = qkv_ptr + b.to(tl.int64) * stride_qb + head * HEAD_DIM
    q = tl.load(qkv_img + (gy * stride_qh + gx * stride_qw)[:, None] + d[None, :], mask=real_m[:, None], other=0.0)
    o_offs = b.to(tl.int64) * stride_ob + head * HEAD_DIM + gy * stride_oh + gx * stride_ow
    o = tl.load(out_ptr + o_offs[:, None] + d[None, :], mask=real_m[:, None], other=0.0)
    do = tl.load(dout_ptr + o_offs[:, None] + d[None, :], mask=real_m[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = ((b.to(tl.int64) * num_heads + head) * H + gy) * W + gx
    tl.store(delta_ptr + row, delta, mask=real_m)
    lse2 = tl.load(lse_ptr + row, mask=real_m, other=float("inf")) * 1.4426950408889634
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    q_rh, q_rw = q_rel_pos_tables(q, table_h_ptr, table_w_ptr, 2 * SEQ_H - 1, 2 * SEQ_W - 1, d,
                                  HEAD_DIM, LP_H, LP_W, precision)
    qk_scale = sm_scale * 1.4426950408889634
    pad_k, pad_v = pad_key_value(pad_ptr, head, d, C, HEAD_DIM, HAS_PAD)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    t_h = tl.zeros([BLOCK_M, LK_H], dtype=tl.float32)
    t_w = tl.zeros([BLOCK_M, LK_W], dtype=tl.float32)
    for start_n in range(0, n_tokens, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ky, kx, in_seq_n, _, k, v = _key_value_tile(qkv_img, offs_n, SEQ_W, n_tokens, origin_y, origin_x, H, W,
                                                    stride_qh, stride_qw, d, pad_k, pad_v, C, HAS_PAD)
        bias = rel_pos_bias_tile(q_rh, q_rw, ty, tx, ky, kx, in_seq_n, SEQ_H, SEQ_W, LP_H, LP_W)
        p = recompute_probs(q, k, bias, in_seq_n, lse2, qk_scale, True, precision)
        dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=precision)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += tl.dot(ds, k.to(q.dtype), input_precision=precision)
        t_h += sum_by_key_coord(ds, ky, in_seq_n, LK_H, precision)
        t_w += sum_by_key_coord(ds, kx, in_seq_n, LK_W, precision)

    # ---- the bias gradient through the gather, then through q.R ----------------------------------
    dq = dq * sm_scale
    pid = tl.program_id(0).to(tl.int64)   # the partial's slot within this launch
    dq = through_rel_pos_table(dq, t_h, q, ty, SEQ_H, table_h_ptr, dtable_h_ptr + pid * (2 * SEQ_H - 1) * HEAD_DIM, d,
                               LK_H, LP_H, HEAD_DIM, precision)
    dq = through_rel_pos_table(dq, t_w, q, tx, SEQ_W, table_w_ptr, dtable_w_ptr + pid * (2 * SEQ_W - 1) * HEAD_DIM, d,
                               LK_W, LP_W, HEAD_DIM, precision)
    g_offs = b.to(tl.int64) * stride_gb + head * HEAD_DIM + gy * stride_gh + gx * stride_gw
    tl.store(dqkv_ptr + g_offs[:, None] + d[None, :], dq.to(dqkv_ptr.dtype.element_ty), mask=real_m[:, None])


@triton.jit
def _rel_pos_attention_bwd_dkv_kernel(
    qkv_ptr, table_h_ptr, table_w_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    dpad_ptr,                       # fp32 partials [programs, 2, d] (k, v), written when HAS_PAD
    pad_ptr,
    stride_qb, stride_qh, stride_qw,
    stride_ob, stride_oh, stride_ow,
    stride_gb, stride_gh, stride_gw,
    H, W, SEQ_H, SEQ_W, windows_w, windows_per_image,
    num_heads, num_n_tiles, sm_scale,
    C: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOWED: tl.constexpr, HAS_PAD: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
):
    pid_n, seq, head = tile_of_program(num_n_tiles, num_heads)
    b, origin_y, origin_x = _sequence_origin(seq, SEQ_H, SEQ_W, windows_w, windows_per_image, WINDOWED)
    n_tokens = SEQ_H * SEQ_W
    d = tl.arange(0, HEAD_DIM)
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ky, kx, ky_g, kx_g, in_seq_n, real_n = _sequence_tokens(offs_n, SEQ_W, n_tokens, origin_y, origin_x, H, W)
    qkv_img = qkv_ptr + b.to(tl.int64) * stride_qb + head * HEAD_DIM
    kv_offs = ky_g * stride_qh + kx_g * stride_qw
    k = tl.load(qkv_img + C + kv_offs[:, None] + d[None, :], mask=real_n[:, None], other=0.0)
    v = tl.load(qkv_img + 2 * C + kv_offs[:, None] + d[None, :], mask=real_n[:, None], other=0.0)
    if HAS_PAD:   # unlike _key_value_tile's callers, this kernel also writes by grid position and sums the padding rows
        is_pad = in_seq_n & ~real_n
        k = tl.where(is_pad[:, None], tl.load(pad_ptr + C + head * HEAD_DIM + d)[None, :], k)
        v = tl.where(is_pad[:, None], tl.load(pad_ptr + 2 * C + head * HEAD_DIM + d)[None, :], v)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, n_tokens, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ty, tx, gy, gx, in_seq_m, real_m = _sequence_tokens(offs_m, SEQ_W, n_tokens, origin_y, origin_x, H, W)
        q = tl.load(qkv_img + (gy * stride_qh + gx * stride_qw)[:, None] + d[None, :], mask=real_m[:, None], other=0.0)
        o_offs = b.to(tl.int64) * stride_ob + head * HEAD_DIM + gy * stride_oh + gx * stride_ow
        do = tl.load(dout_ptr + o_offs[:, None] + d[None, :], mask=real_m[:, None], other=0.0)
        row = ((b.to(tl.int64) * num_heads + head) * H + gy) * W + gx
        lse2 = tl.load(lse_ptr + row, mask=real_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row, mask=real_m, other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        q_rh, q_rw = q_rel_pos_tables(q, table_h_ptr, table_w_ptr, 2 * SEQ_H - 1, 2 * SEQ_W - 1, d,
                                      HEAD_DIM, LP_H, LP_W, precision)
        bias = rel_pos_bias_tile(q_rh, q_rw, ty, tx, ky, kx, in_seq_n, SEQ_H, SEQ_W, LP_H, LP_W)
        p = recompute_probs(q, k, bias, in_seq_n, lse2, qk_scale, True, precision)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=precision)
        dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=precision)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += tl.dot(tl.trans(ds), q, input_precision=precision)
    dk = dk * sm_scale

    g_offs = b.to(tl.int64) * stride_gb + head * HEAD_DIM + ky_g * stride_gh + kx_g * stride_gw
    tl.store(dqkv_ptr + C + g_offs[:, None] + d[None, :], dk.to(dqkv_ptr.dtype.element_ty), mask=real_n[:, None])
    tl.store(dqkv_ptr + 2 * C + g_offs[:, None] + d[None, :], dv.to(dqkv_ptr.dtype.element_ty), mask=real_n[:, None])
    if HAS_PAD:
        part = dpad_ptr + tl.program_id(0).to(tl.int64) * 2 * HEAD_DIM
        tl.store(part + d, tl.sum(tl.where(is_pad[:, None], dk, 0.0), 0))
        tl.store(part + HEAD_DIM + d, tl.sum(tl.where(is_pad[:, None], dv, 0.0), 0))


def kernels_for(interpret: bool):
    from ._runtime import check_mode

    return (check_mode(_rel_pos_attention_bwd_dq_kernel, interpret), check_mode(_rel_pos_attention_bwd_dkv_kernel, interpret))


def launch_args(qkv_shape, num_heads: int, window_size: int):
    """Geometry, configs and both launch grids (from shapes alone)."""
    from .rel_pos_attention import launch_args as fwd_launch_args

    geo = fwd_launch_args(qkv_shape, num_heads, window_size)
    name, dq_cfg, dkv_cfg = rel_pos_attention_bwd_config(window_size, geo["seq_h"], geo["seq_w"])
    n = geo["seq_h"] * geo["seq_w"]
    num_m_tiles, num_n_tiles = triton.cdiv(n, dq_cfg["BLOCK_M"]), triton.cdiv(n, dkv_cfg["BLOCK_N"])
    programs = geo["num_seqs"] * num_heads
    dq_programs = num_m_tiles * programs
    return dict(geo, config_name=name, dq_config=dq_cfg, dkv_config=dkv_cfg, num_m_tiles=num_m_tiles,
                num_n_tiles=num_n_tiles, dq_programs=dq_programs, dq_grid=launch_grid(min(dq_programs, DQ_PROGRAMS)),
                dkv_grid=launch_grid(num_n_tiles * programs))


# dq programs per launch: about 8 per SM on an H100, enough to fill it; bounds the table-gradient
# partials (one [2 S - 1, d] fp32 block per program of a launch) whatever the batch
DQ_PROGRAMS = 1024


def rel_pos_attention_bwd(dout, qkv, table_h, table_w, num_heads: int, window_size: int, pad_kv, out, lse,
                          interpret: bool = False):
    """Gradients ``(dqkv [B, H, W, 3C], dtable_h [2 S_h - 1, d] fp32, dtable_w fp32, dpad [3C] fp32
    or None)`` from the forward's ``out`` and ``lse``. Tables as the forward took them."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    geo = launch_args(qkv.shape, num_heads, window_size)
    seq_h, seq_w = geo["seq_h"], geo["seq_w"]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    dout = dout.contiguous()
    out = out.contiguous()
    has_pad = pad_kv is not None and window_size > 0
    table_h = table_h.to(qkv.dtype).contiguous()
    table_w = table_w.to(qkv.dtype).contiguous()
    pad = pad_kv.to(qkv.dtype).contiguous() if has_pad else table_h   # unused when HAS_PAD=0
    dqkv = torch.empty(B, H, W, C3, device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty_like(lse)
    dtable_h = torch.empty(geo["dq_grid"][0], 2 * seq_h - 1, head_dim, device=qkv.device, dtype=torch.float32)
    dtable_w = torch.empty(geo["dq_grid"][0], 2 * seq_w - 1, head_dim, device=qkv.device, dtype=torch.float32)
    dpad = torch.empty(geo["dkv_grid"][0] if has_pad else 1, 2, head_dim, device=qkv.device, dtype=torch.float32)
    upcast = interpret and qkv.dtype == torch.bfloat16
    common = dict(C=C, HEAD_DIM=head_dim, WINDOWED=window_size > 0, HAS_PAD=has_pad,
                  IEEE_DOT=qkv.dtype == torch.float32 or upcast, UPCAST_DOT=upcast)
    strides = (qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
               dqkv.stride(0), dqkv.stride(1), dqkv.stride(2))
    sizes = (H, W, seq_h, seq_w, geo["windows_w"], geo["windows_per_image"], num_heads)
    dq_kernel, dkv_kernel = kernels_for(interpret)
    sum_h = torch.zeros(2 * seq_h - 1, head_dim, device=qkv.device, dtype=torch.float32)
    sum_w = torch.zeros(2 * seq_w - 1, head_dim, device=qkv.device, dtype=torch.float32)
    for offset in range(0, geo["dq_programs"], DQ_PROGRAMS):   # slices fixed by shapes: deterministic
        n = min(DQ_PROGRAMS, geo["dq_programs"] - offset)
        dq_kernel[launch_grid(n)](
            qkv, table_h, table_w, out, dout, lse, delta, dqkv, dtable_h, dtable_w, pad, *strides, *sizes,
            geo["num_m_tiles"], offset, head_dim ** -0.5, **common, **geo["dq_config"])
        sum_h += dtable_h[:n].sum(0)
        sum_w += dtable_w[:n].sum(0)
    dkv_kernel[geo["dkv_grid"]](
        qkv, table_h, table_w, dout, lse, delta, dqkv, dpad, pad, *strides, *sizes,
        geo["num_n_tiles"], head_dim ** -0.5, **common, **geo["dkv_config"])
    dtable_h, dtable_w = sum_h, sum_w
    if not has_pad:
        return dqkv, dtable_h, dtable_w, None
    dpad = dpad.view(geo["num_seqs"], num_heads, geo["num_n_tiles"], 2, head_dim).sum((0, 2))   # [heads, 2, d]
    dpad = torch.cat([dpad.new_zeros(C), dpad.permute(1, 0, 2).reshape(2 * C)])   # padded queries: no gradient
    return dqkv, dtable_h, dtable_w, dpad
