"""SAM attention with decomposed relative position, windowed or global."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import dispatch, reference
from ._common import FLOAT_DTYPES, LIBRARY, REFERENCE_DEVICES, check_int, check_shape, check_tensor, derived, impl_of, run, triton_backends

OP = "rel_pos_attention"


def rel_pos_attention(
    qkv: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    num_heads: int,
    window_size: int = 0,
    pad_kv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + q.Rh + q.Rw) v`` per head, over windows or the whole grid.

    Args:
        qkv: ``[B, H, W, 3C]``, the qkv Linear's output on the real (unpadded) grid, laid out
            ``[q | k | v]`` with heads contiguous; fp32, fp16 or bf16.
        rel_pos_h, rel_pos_w: ``[L, d]`` tables (``d = C / num_heads``); resized linearly in fp32
            to ``2 * S - 1`` rows when they have another length (``S`` = window or grid side).
        num_heads: heads; ``C`` must divide by it.
        window_size: 0 for global attention over ``H x W``; otherwise the side of square windows
            (row-major order). The grid is padded bottom/right to a multiple of it.
        pad_kv: ``[3C]``, the q/k/v of padded tokens (upstream pads before the qkv Linear, so this
            is the qkv bias); padded keys are attended to, not masked. None means zeros.

    Returns:
        ``[B, H, W, C]``, un-partitioned and cropped, ready for ``proj``.

    Equivalent PyTorch: :func:`deepencoder_kernels.reference.rel_pos_attention`.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, device or shape.
    """
    check_tensor("qkv", qkv, ndim=4, dtypes=FLOAT_DTYPES)
    num_heads = check_int("num_heads", num_heads, low=1)
    window_size = check_int("window_size", window_size, low=0)
    B, H, W, C3 = qkv.shape
    if min(B, H, W) < 1:
        raise ValueError(f"qkv must have non-empty batch and grid dims, got shape {list(qkv.shape)}")
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim must be 3 * num_heads * head_dim = 3 * {num_heads} * d, got {C3}")
    d = C3 // (3 * num_heads)
    for name, t in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=qkv.device)
        check_shape(name, t, (None, d))
        if t.shape[0] < 1:
            raise ValueError(f"{name} must have at least one row, got shape {list(t.shape)}")
    if pad_kv is not None:
        check_tensor("pad_kv", pad_kv, ndim=1, dtypes=FLOAT_DTYPES, device=qkv.device)
        check_shape("pad_kv", pad_kv, (C3,))
    args = (qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv)
    return run(OP, _rel_pos_attention_op, args, qkv.device, qkv.dtype)


@torch.library.custom_op(f"{LIBRARY}::{OP}", mutates_args=())
def _rel_pos_attention_op(
    qkv: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    num_heads: int,
    window_size: int,
    pad_kv: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    return impl_of(OP, backend)(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv)


@_rel_pos_attention_op.register_fake
def _(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv, backend):
    B, H, W, C3 = qkv.shape
    return qkv.new_empty(B, H, W, C3 // 3)


def flops(qkv_shape, num_heads: int, window_size: int) -> int:
    """Multiply-adds x 2 of the attention over padded windows (or the grid): QK^T, PV, q.Rh, q.Rw."""
    B, H, W, C3 = qkv_shape
    C = C3 // 3
    if window_size > 0:
        Hp, Wp = reference.padded_size(H, window_size), reference.padded_size(W, window_size)
        seqs, h, w = B * (Hp // window_size) * (Wp // window_size), window_size, window_size
    else:
        seqs, h, w = B, H, W
    n = h * w
    return seqs * (4 * n * n * C + 2 * n * (h + w) * C)


@register_flop_formula(torch.ops.deepencoder_kernels.rel_pos_attention)
def _flop_formula(qkv_shape, rel_h_shape, rel_w_shape, num_heads, window_size, *args, **kwargs) -> int:
    return flops(qkv_shape, num_heads, window_size)


dispatch.register(OP, dispatch.Backend("reference", reference.rel_pos_attention, REFERENCE_DEVICES, FLOAT_DTYPES, custom_op=False))


# ---- fused Triton backend --------------------------------------------------------------------
FUSED_HEAD_DIMS = (16, 32, 64, 128)
def sequence_tables(rel_pos_h, rel_pos_w, seq_h: int, seq_w: int):
    """The rel-pos tables resized to ``2 S - 1`` rows, once per (parameter version, grid)."""
    return derived((rel_pos_h, rel_pos_w), ("sequence", seq_h, seq_w), lambda: (
        reference.resize_rel_pos(rel_pos_h.detach(), 2 * seq_h - 1), reference.resize_rel_pos(rel_pos_w.detach(), 2 * seq_w - 1)))


def _fused(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv, interpret: bool):
    from deepencoder_kernels.kernels.rel_pos_attention import rel_pos_attention_fwd

    _, H, W, _ = qkv.shape
    seq_h, seq_w = (window_size, window_size) if window_size else (H, W)
    table_h, table_w = sequence_tables(rel_pos_h, rel_pos_w, seq_h, seq_w)
    return rel_pos_attention_fwd(qkv, table_h, table_w, num_heads, window_size, pad_kv, interpret=interpret)


def _fused_accepts(qkv, rel_pos_h, rel_pos_w, num_heads, *rest):
    d = qkv.shape[-1] // (3 * num_heads)
    return None if d in FUSED_HEAD_DIMS else f"head_dim {d} not in {FUSED_HEAD_DIMS}"


triton_backends(OP, _fused, _fused_accepts)
