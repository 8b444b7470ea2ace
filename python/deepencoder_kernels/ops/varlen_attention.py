"""Attention over packed variable-length sequences, with an optional per-sequence SAM rel-pos bias."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import dispatch, reference
from ._common import (FLOAT_DTYPES, LIBRARY, REFERENCE_DEVICES, capturing, check_cu_seqlens, check_int, check_shape, check_tensor,
                      derived, impl_of, kernel_layout, run, triton_backends)

OP = "varlen_attention"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
    rel_pos_h: Optional[torch.Tensor] = None,
    rel_pos_w: Optional[torch.Tensor] = None,
    grid_hw: Optional[torch.Tensor] = None,
    check_values: bool = True,
    allow_empty: bool = False,
    max_side: Optional[int] = None,
) -> torch.Tensor:
    """Non-causal softmax attention within each packed sequence (``flash_attn_varlen_func``-style).

    Args:
        q, k, v: ``[total, heads, d]``, same shape, dtype and device.
        cu_seqlens: int32 ``[num_seqs + 1]``: sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
            An empty sequence is an error unless ``allow_empty`` (then it produces nothing; e.g. the
            ``cu_seqlens`` of a saccade gather where some image's budget is 0).
        max_seqlen: longest sequence (a Python int, so launching needs no device sync).
        scale: softmax scale, default ``1 / sqrt(d)``.
        rel_pos_h, rel_pos_w: optional ``[L, d]`` SAM tables; with them, ``grid_hw`` (int32
            ``[num_seqs, 2]``, ``h * w`` = the sequence's length) gives each sequence's grid and
            the decomposed bias ``q.Rh + q.Rw`` (unscaled q) is added after scaling.
        check_values: check ``cu_seqlens``/``grid_hw`` values (a host read); pass False for
            sequences your own code built (the kernel handles empty ones either way). Skipped
            while the current CUDA stream is capturing a graph (the values are the replay's).
        allow_empty: accept zero-length sequences in the checks.
        max_side: with a bias, a host int bounding every grid side (``grid_hw`` values), as
            ``max_seqlen`` bounds the lengths: with it nothing is read to the host, so the call
            can be captured in a CUDA graph and replayed with other grids up to that side. None:
            read ``grid_hw`` to the host for it (eager only).

    Returns:
        ``[total, heads, d]``.

    Equivalent PyTorch: :func:`deepencoder_kernels.reference.varlen_attention`.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=(q.dtype,), device=q.device)
        check_shape(name, t, tuple(q.shape))
    total, heads, d = q.shape
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    q, k, v = (kernel_layout(t, rows=True) for t in (q, k, v))
    cu_seqlens = kernel_layout(cu_seqlens)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold num_seqs + 1 >= 2 offsets, got shape {list(cu_seqlens.shape)}")
    max_seqlen = check_int("max_seqlen", max_seqlen, low=0)
    if scale is not None and not (isinstance(scale, float) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if (rel_pos_h is None) != (rel_pos_w is None) or (rel_pos_h is None) != (grid_hw is None):
        raise ValueError("rel_pos_h, rel_pos_w and grid_hw must be given together or not at all")
    if rel_pos_h is not None:
        for name, t in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
            check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
            check_shape(name, t, (None, d))
        check_tensor("grid_hw", grid_hw, ndim=2, dtypes=(torch.int32,), device=q.device)
        check_shape("grid_hw", grid_hw, (cu_seqlens.shape[0] - 1, 2))
        grid_hw = kernel_layout(grid_hw)
        rel_pos_h, rel_pos_w = kernel_layout(rel_pos_h), kernel_layout(rel_pos_w)
    if grid_hw is None:
        max_side = 0
    elif max_side is not None:
        max_side = check_int("max_side", max_side, low=1)
    elif capturing(q.device):
        raise ValueError("max_side (a host int bounding grid_hw's values) is needed while capturing a CUDA graph: "
                         "grid_hw cannot be read to the host there")
    else:
        max_side = max(1, int(grid_hw.max())) if grid_hw.numel() else 1
    if check_values and not capturing(q.device):
        lengths = check_cu_seqlens("cu_seqlens", cu_seqlens, total, max_seqlen, allow_empty)
        if grid_hw is not None:
            for i, ((h, w), n) in enumerate(zip(grid_hw.tolist(), lengths)):
                if h < 1 or w < 1 or h * w != n:
                    raise ValueError(f"grid_hw[{i}] = ({h}, {w}) must be positive with h * w = sequence length {n}")
                if max(h, w) > max_side:
                    raise ValueError(f"grid_hw[{i}] = ({h}, {w}) exceeds max_side={max_side}")
    args = (q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side)
    return run(OP, _varlen_attention_op, args, q.device, q.dtype)


def _reference(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side):
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw)


@torch.library.custom_op(f"{LIBRARY}::{OP}", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float],
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    grid_hw: Optional[torch.Tensor],
    max_side: int,
    backend: str,
) -> torch.Tensor:
    return impl_of(OP, backend)(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, backend):
    return torch.empty_like(q)


@register_flop_formula(torch.ops.deepencoder_kernels.varlen_attention)
def _flop_formula(q_shape, k_shape, v_shape, cu_shape, max_seqlen, *args, **kwargs) -> int:
    # Lengths are data, not shapes: bound by max_seqlen (exact when all sequences are that long).
    total, heads, d = q_shape
    return 4 * total * max_seqlen * heads * d


dispatch.register(OP, dispatch.Backend("reference", _reference, REFERENCE_DEVICES, FLOAT_DTYPES, custom_op=False))


# ---- fused Triton backend --------------------------------------------------------------------

def packed_bias_tables(rel_pos_h, rel_pos_w, grid_hw, max_side: int):
    """Per-sequence rel-pos tables for the kernel, with no host read: each axis's table resized to
    ``2 s - 1`` rows for every side ``s`` in 1..``max_side`` (the reference's interpolation), all
    concatenated (side ``s`` starts at row ``(s - 1)^2``), cached per (parameter version, max_side);
    each sequence's first rows computed on the device from ``grid_hw``. The same tables serve any
    grids up to ``max_side``, so a captured CUDA graph replays with other grids."""
    def make():
        return tuple(torch.cat([reference.resize_rel_pos(t.detach(), 2 * s - 1) for s in range(1, max_side + 1)])
                     for t in (rel_pos_h, rel_pos_w))

    tables_h, tables_w = derived((rel_pos_h, rel_pos_w), ("packed", max_side), make)
    grid = grid_hw.clamp(1, max_side)   # a side past max_side (unchecked input) must not read past the tables
    table_rows = (grid - 1).square()
    return grid, tables_h, tables_w, table_rows, max_side, max_side


def _fused(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, interpret: bool):
    from deepencoder_kernels.kernels.varlen_attention import varlen_attention_fwd

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tables = packed_bias_tables(rel_pos_h, rel_pos_w, grid_hw, max_side) if rel_pos_h is not None and grid_hw.shape[0] else None
    return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, tables, interpret=interpret)


def _fused_accepts(q, *rest):
    from .rel_pos_attention import FUSED_HEAD_DIMS

    d = q.shape[-1]
    return None if d in FUSED_HEAD_DIMS else f"head_dim {d} not in {FUSED_HEAD_DIMS}"


triton_backends(OP, _fused, _fused_accepts)
