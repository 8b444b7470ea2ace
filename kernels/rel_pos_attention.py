"""Fused SAM attention with decomposed relative position, windowed or global (forward).

One program = one (q tile, sequence, head). A "sequence" is a 14 x 14 window (windowed blocks) or
the whole grid (global blocks); which grid tokens it holds is index math on the qkv Linear's
``[B, H, W, 3C]`` output, so there is no pad/partition/unpartition copy. Window tokens past the
grid's bottom/right edge are upstream's zero padding pushed through the qkv Linear: their q/k/v are
the qkv bias (``pad_ptr``) and they stay unmasked as keys; their outputs are never stored.

The rel-pos bias is never materialised: per q tile, ``qR = q @ table^T`` ([BLOCK_M, LP], fp32, on
chip) holds q against every table row; each key tile gathers ``bias[i, j] = qRh[i, y_i - y_j + S_h - 1]
+ qRw[i, x_i - x_j + S_w - 1]``. Softmax is online in fp32 with exp2. Those three steps live in
``attention_core`` and are shared with the varlen kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_core import online_softmax_step, q_rel_pos_tables, rel_pos_bias_tile, tile_of_program
from ._runtime import launch_grid
from .configs import rel_pos_attention_config



@triton.jit
def _sequence_tokens(offs, SEQ_W, n_tokens, origin_y, origin_x, H, W):
    """Token indexes of a sequence -> (row, col) inside it, (row, col) on the grid, and masks:
    in the sequence at all, and a real grid token (not window padding)."""
    ty = offs // SEQ_W
    tx = offs % SEQ_W
    gy = origin_y + ty
    gx = origin_x + tx
    in_seq = offs < n_tokens
    real = in_seq & (gy < H) & (gx < W)
    return ty, tx, gy, gx, in_seq, real


@triton.jit
def _bias_h_per_key_tile(q, q_rw, table_h_ptr, ty, tx, ky, kx, valid_n, qy_first, ky_last, seq_h, seq_w, d,
                         HEAD_DIM: tl.constexpr, LP_W: tl.constexpr, QR_TILE: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile's bias with ``q R_h`` computed here for only the table rows this (q tile, key
    tile) pair indexes: ``y_i - y_j + seq_h - 1`` spans the q tile's rows + the key tile's rows - 1
    values (the launcher sizes QR_TILE to that), so just the w table stays on chip for the whole q
    tile: half the registers of both tables, room for twice the q rows. One [BLOCK_M, QR_TILE] dot
    per key tile more."""
    first = qy_first - ky_last + seq_h - 1
    rows = first + tl.arange(0, QR_TILE)
    table = tl.load(table_h_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=((rows >= 0) & (rows < 2 * seq_h - 1))[:, None],
                    other=0.0)
    q_rh = tl.dot(q, tl.trans(table.to(q.dtype)), input_precision=PRECISION)
    idx_h = tl.where(valid_n[None, :], ty[:, None] - ky[None, :] + seq_h - 1 - first, 0)
    idx_h = tl.minimum(tl.maximum(idx_h, 0), QR_TILE - 1)   # only dead q rows reach the clamp
    idx_w = tl.where(valid_n[None, :], tx[:, None] - kx[None, :] + seq_w - 1, 0)
    idx_w = tl.minimum(tl.maximum(idx_w, 0), LP_W - 1)
    return tl.gather(q_rh, idx_h, 1) + tl.gather(q_rw, idx_w, 1)


@triton.jit
def _key_value_tile(qkv_img, offs_n, SEQ_W, n_tokens, origin_y, origin_x, H, W, stride_qh, stride_qw, d, pad_k, pad_v,
                    C: tl.constexpr, HAS_PAD: tl.constexpr):
    """k and v of a key tile (window-padding keys take the qkv bias ``pad_k``/``pad_v``: unmasked, as
    upstream), with the keys' (row, col) in the sequence and their in-sequence / real-token masks."""
    ky, kx, ky_g, kx_g, in_seq_n, real_n = _sequence_tokens(offs_n, SEQ_W, n_tokens, origin_y, origin_x, H, W)
    kv_offs = ky_g * stride_qh + kx_g * stride_qw
    k = tl.load(qkv_img + C + kv_offs[:, None] + d[None, :], mask=real_n[:, None], other=0.0)
    v = tl.load(qkv_img + 2 * C + kv_offs[:, None] + d[None, :], mask=real_n[:, None], other=0.0)
    if HAS_PAD:
        is_pad = (in_seq_n & ~real_n)[:, None]
        k = tl.where(is_pad, pad_k[None, :], k)
        v = tl.where(is_pad, pad_v[None, :], v)
    return ky, kx, in_seq_n, real_n, k, v


@triton.jit
def pad_key_value(pad_ptr, head, d, C: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr):
    """This head's k and v of window-padding tokens (the qkv bias), loaded once per program."""
    if HAS_PAD:
        pad_k = tl.load(pad_ptr + C + head * HEAD_DIM + d)
        pad_v = tl.load(pad_ptr + 2 * C + head * HEAD_DIM + d)
    else:   # never read
        pad_k = tl.zeros([HEAD_DIM], dtype=pad_ptr.dtype.element_ty)
        pad_v = pad_k
    return pad_k, pad_v


@triton.jit
def _rel_pos_attention_fwd_kernel(
    qkv_ptr, pad_ptr, table_h_ptr, table_w_ptr, out_ptr,
    lse_ptr,                    # fp32 [B, heads, H, W] (natural log), written only when STORE_LSE
    stride_qb, stride_qh, stride_qw,
    stride_ob, stride_oh, stride_ow,
    H, W,                       # the real grid
    SEQ_H, SEQ_W,               # the sequence grid: window side, or H and W
    windows_w, windows_per_image,
    num_heads, num_m_tiles, sm_scale,
    C: tl.constexpr,            # channels (offset of k in qkv; v at 2C)
    HEAD_DIM: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_PAD: tl.constexpr,
    IEEE_DOT: tl.constexpr,     # fp32 dot operands: full precision instead of tf32
    UPCAST_DOT: tl.constexpr,   # dot in fp32 (Triton 3.9's interpreter gets bf16 tl.dot wrong)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LP_H: tl.constexpr, LP_W: tl.constexpr,
    STORE_LSE: tl.constexpr = False,   # training: keep each row's logsumexp for the backward
    QR_TILE: tl.constexpr = 0,         # > 0: q.R_h per key tile, this many table rows (_bias_h_per_key_tile)
):
    pid_m, seq, head = tile_of_program(num_m_tiles, num_heads)
    if WINDOWED:
        b = seq // windows_per_image
        win = seq % windows_per_image
        origin_y = (win // windows_w) * SEQ_H
        origin_x = (win % windows_w) * SEQ_W
    else:
        b = seq
        origin_y = 0
        origin_x = 0
    n_tokens = SEQ_H * SEQ_W
    d = tl.arange(0, HEAD_DIM)
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"

    # ---- q tile: rows past the sequence are dead; rows past the grid are padding ----------------
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ty, tx, gy, gx, in_seq_m, real_m = _sequence_tokens(offs_m, SEQ_W, n_tokens, origin_y, origin_x, H, W)
    # int64 only for the image base; offsets inside one image fit int32 (80 x 80 x 3C << 2^31)
    qkv_img = qkv_ptr + b.to(tl.int64) * stride_qb + head * HEAD_DIM
    q_offs = gy * stride_qh + gx * stride_qw
    q = tl.load(qkv_img + q_offs[:, None] + d[None, :], mask=real_m[:, None], other=0.0)
    if HAS_PAD:
        pad_q = tl.load(pad_ptr + head * HEAD_DIM + d)
        q = tl.where((in_seq_m & ~real_m)[:, None], pad_q[None, :], q)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # ---- q against every rel-pos table row, kept on chip (with QR_TILE: the w table only) --------
    if QR_TILE == 0:
        q_rh, q_rw = q_rel_pos_tables(q, table_h_ptr, table_w_ptr, 2 * SEQ_H - 1, 2 * SEQ_W - 1, d,
                                      HEAD_DIM, LP_H, LP_W, precision)
    else:
        rows_w = tl.arange(0, LP_W)
        table_w = tl.load(table_w_ptr + rows_w[:, None] * HEAD_DIM + d[None, :], mask=(rows_w < 2 * SEQ_W - 1)[:, None], other=0.0)
        q_rw = tl.dot(q, tl.trans(table_w.to(q.dtype)), input_precision=precision)
        qy_first = (pid_m * BLOCK_M) // SEQ_W

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634   # LOG2E
    pad_k, pad_v = pad_key_value(pad_ptr, head, d, C, HEAD_DIM, HAS_PAD)

    for start_n in range(0, n_tokens, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ky, kx, in_seq_n, _, k, v = _key_value_tile(qkv_img, offs_n, SEQ_W, n_tokens, origin_y, origin_x, H, W,
                                                    stride_qh, stride_qw, d, pad_k, pad_v, C, HAS_PAD)
        if QR_TILE == 0:
            bias = rel_pos_bias_tile(q_rh, q_rw, ty, tx, ky, kx, in_seq_n, SEQ_H, SEQ_W, LP_H, LP_W)
        else:
            ky_last = (tl.minimum(start_n + BLOCK_N, n_tokens) - 1) // SEQ_W
            bias = _bias_h_per_key_tile(q, q_rw, table_h_ptr, ty, tx, ky, kx, in_seq_n, qy_first, ky_last, SEQ_H, SEQ_W,
                                        d, HEAD_DIM, LP_W, QR_TILE, precision)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, bias, in_seq_n, qk_scale, True, precision)

    out = acc / l_i[:, None]
    out_img = out_ptr + b.to(tl.int64) * stride_ob + head * HEAD_DIM
    o_offs = gy * stride_oh + gx * stride_ow
    tl.store(out_img + o_offs[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=real_m[:, None])
    if STORE_LSE:  # padded query rows are cropped: the backward never needs theirs
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453   # LN2: log2 units -> natural
        tl.store(lse_ptr + ((b.to(tl.int64) * num_heads + head) * H + gy) * W + gx, lse, mask=real_m)


def kernel_for(interpret: bool):
    """The kernel, checked against the mode Triton decorated it in (decided at import time)."""
    from ._runtime import check_mode

    return check_mode(_rel_pos_attention_fwd_kernel, interpret)


def launch_args(qkv_shape, num_heads: int, window_size: int, device=None):
    """Sequence geometry, config and launch grid for a call (from shapes alone): shared by the
    launcher, the static report and the launch-limit tests."""
    B, H, W, C3 = qkv_shape
    if window_size > 0:
        seq_h = seq_w = window_size
        windows_h, windows_w = -(-H // window_size), -(-W // window_size)
    else:
        seq_h, seq_w, windows_h, windows_w = H, W, 1, 1
    name, cfg = rel_pos_attention_config(window_size, seq_h, seq_w, device)   # device: its tuned table, if any
    num_seqs = B * windows_h * windows_w
    num_m_tiles = triton.cdiv(seq_h * seq_w, cfg["BLOCK_M"])
    return dict(seq_h=seq_h, seq_w=seq_w, windows_w=windows_w, windows_per_image=windows_h * windows_w,
                num_seqs=num_seqs, num_m_tiles=num_m_tiles, grid=launch_grid(num_m_tiles * num_seqs * num_heads),
                config_name=name, config=cfg)


def rel_pos_attention_fwd(qkv, table_h, table_w, num_heads: int, window_size: int, pad_kv, interpret: bool = False,
                          with_lse: bool = False):
    """Launch on validated inputs; ``table_h/w`` are already ``2 S - 1`` rows long. ``with_lse``:
    return ``(out, lse)``, the fp32 ``[B, heads, H, W]`` row logsumexp the backward needs."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    geo = launch_args(qkv.shape, num_heads, window_size, qkv.device)
    cfg = dict(geo["config"])
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty(B, H, W, C, device=qkv.device, dtype=qkv.dtype)
    table_h = table_h.to(qkv.dtype).contiguous()
    table_w = table_w.to(qkv.dtype).contiguous()
    pad = pad_kv.to(qkv.dtype).contiguous() if pad_kv is not None else table_h  # unused when HAS_PAD=0
    lse = torch.empty(B, num_heads, H, W, device=qkv.device, dtype=torch.float32) if with_lse else out
    upcast = interpret and qkv.dtype == torch.bfloat16  # exact: bf16 products fit fp32
    kernel_for(interpret)[geo["grid"]](
        qkv, pad, table_h, table_w, out, lse,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, W, geo["seq_h"], geo["seq_w"], geo["windows_w"], geo["windows_per_image"],
        num_heads, geo["num_m_tiles"], head_dim ** -0.5,
        C=C, HEAD_DIM=head_dim, WINDOWED=window_size > 0, HAS_PAD=pad_kv is not None and window_size > 0,
        IEEE_DOT=qkv.dtype == torch.float32 or upcast, UPCAST_DOT=upcast, STORE_LSE=with_lse,
        **cfg,
    )
    return (out, lse) if with_lse else out
