"""Attention over packed variable-length sequences, with an optional per-sequence SAM rel-pos bias."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import dispatch, reference
from . import _sdpa_blocked
from ._common import (FLOAT_DTYPES, LIBRARY, REFERENCE_DEVICES, TRITON_INTERPRET, capturing, check_cu_seqlens, check_int, check_shape, check_tensor,
                      derived, impl_of, kernel_layout, needs_grad, run, triton_backends)

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
    prefix_lens: Optional[torch.Tensor] = None,
    rope_cos: Optional[torch.Tensor] = None,
    rope_sin: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence (``flash_attn_varlen_func``-style): bidirectional
    (CLIP), with SAM's rel-pos bias per sequence, or prefix-LM with GQA and RoPE (DeepEncoder V2's
    causal-flow stage).

    Args:
        q: ``[total, heads, d]``.
        k, v: ``[total, kv_heads, d]``, same dtype and device as q, ``heads % kv_heads == 0``
            (grouped-query attention: query head ``h`` reads kv head ``h // (heads // kv_heads)``,
            transformers' ``repeat_kv`` order; K/V are read in place, never repeated).
        cu_seqlens: int32 ``[num_seqs + 1]``: sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
            An empty sequence is an error unless ``allow_empty`` (then it produces nothing; e.g. the
            ``cu_seqlens`` of a saccade gather where some image's budget is 0).
        max_seqlen: longest sequence (a Python int, so launching needs no device sync).
        scale: softmax scale, default ``1 / sqrt(d)``.
        rel_pos_h, rel_pos_w: optional ``[L, d]`` SAM tables; with them, ``grid_hw`` (int32
            ``[num_seqs, 2]``, ``h * w`` = the sequence's length) gives each sequence's grid and
            the decomposed bias ``q.Rh + q.Rw`` (unscaled q) is added after scaling.
        check_values: check ``cu_seqlens``/``grid_hw``/``prefix_lens`` values (a host read); pass
            False for sequences your own code built (the kernel handles empty ones either way and
            clamps prefixes to the length). Skipped while tracing under ``torch.compile`` (so
            ``fullgraph=True`` holds; the compiled call checks nothing) and while the current CUDA
            stream is capturing a graph (the values are the replay's).
        allow_empty: accept zero-length sequences in the checks.
        max_side: with a bias, a host int bounding every grid side (``grid_hw`` values), as
            ``max_seqlen`` bounds the lengths: with it nothing is read to the host, so the call
            can be captured in a CUDA graph and replayed with other grids up to that side. None:
            read ``grid_hw`` to the host for it (eager only: an error under torch.compile or capture).
        prefix_lens: int32 ``[num_seqs]`` on q's device: the prefix-LM mask, no mask tensor: rows
            ``i < p`` attend to keys ``j < p``, rows ``i >= p`` to keys ``j <= i`` (p = 0 is causal, p =
            the length is bidirectional). DeepEncoder V2: p = n image tokens, then n causal queries.
        rope_cos, rope_sin: ``[R, d]`` with ``R >= max_seqlen``, as the model computes them
            (transformers' layout: ``cat(freqs, freqs)``; any float dtype, cast to q's dtype): RoPE
            applied to q and k (rotate-half), position = index within the sequence. Together or not at all.

    Raises:
        TypeError / ValueError naming the argument: wrong dtype, shape, device, head counts that do
        not divide, tables shorter than ``max_seqlen``, and (with ``check_values``) offsets, grids or
        prefix lengths out of range.

    Returns:
        ``[total, heads, d]``.

    Equivalent PyTorch: :func:`deepencoder_kernels.reference.varlen_attention`.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    total, heads, d = q.shape
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_shape("k", k, (total, None, d))
    kv_heads = k.shape[1]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k has {kv_heads} heads, which must divide q's {heads} heads (grouped-query attention)")
    check_tensor("v", v, dtypes=(q.dtype,), device=q.device)
    check_shape("v", v, tuple(k.shape))
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
    elif capturing(q.device) or torch.compiler.is_compiling():
        raise ValueError("max_side (a host int bounding grid_hw's values) is needed under torch.compile and while capturing "
                         "a CUDA graph: grid_hw cannot be read to the host there")
    else:
        max_side = max(1, int(grid_hw.max())) if grid_hw.numel() else 1
    if prefix_lens is not None:
        check_tensor("prefix_lens", prefix_lens, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape("prefix_lens", prefix_lens, (cu_seqlens.shape[0] - 1,))
        prefix_lens = kernel_layout(prefix_lens)
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together or not at all")
    if rope_cos is not None:
        if d % 2:
            raise ValueError(f"RoPE (rotate-half) needs an even head dim, got d = {d}")
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
            check_shape(name, t, (None, d))
            if t.shape[0] < max_seqlen:
                raise ValueError(f"{name} has {t.shape[0]} positions, fewer than max_seqlen={max_seqlen}")
        rope_cos, rope_sin = kernel_layout(rope_cos), kernel_layout(rope_sin)
    if check_values and not capturing(q.device) and not torch.compiler.is_compiling():   # host reads: eager only
        lengths = check_cu_seqlens("cu_seqlens", cu_seqlens, total, max_seqlen, allow_empty)
        if grid_hw is not None:
            for i, ((h, w), n) in enumerate(zip(grid_hw.tolist(), lengths)):
                if h < 1 or w < 1 or h * w != n:
                    raise ValueError(f"grid_hw[{i}] = ({h}, {w}) must be positive with h * w = sequence length {n}")
                if max(h, w) > max_side:
                    raise ValueError(f"grid_hw[{i}] = ({h}, {w}) exceeds max_side={max_side}")
        if prefix_lens is not None:
            for i, (p, n) in enumerate(zip(prefix_lens.tolist(), lengths)):
                if not 0 <= p <= n:
                    raise ValueError(f"prefix_lens[{i}] = {p} must be in [0, sequence length {n}]")
    args = (q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens, rope_cos, rope_sin)
    return run(OP, _call_op, args, q.device, q.dtype)


def _call_op(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens, rope_cos,
             rope_sin, backend):
    """The custom op; under autograd its training variant, which also keeps the row logsumexp and
    takes the packed tables (every side up to ``max_side``) resized differentiably here, so autograd
    differentiates the interpolation as upstream's does."""
    if not needs_grad(q, k, v, rel_pos_h, rel_pos_w):
        return _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side,
                                    prefix_lens, rope_cos, rope_sin, backend)
    tables_h = tables_w = None
    if rel_pos_h is not None:
        tables_h, tables_w = (torch.cat([reference.resize_rel_pos(t, 2 * s - 1) for s in range(1, max_side + 1)])
                              for t in (rel_pos_h, rel_pos_w))
    return _varlen_attention_train_op(q, k, v, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side, prefix_lens,
                                      rope_cos, rope_sin, backend)[0]


def _reference(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens, rope_cos,
               rope_sin):
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, prefix_lens,
                                      rope_cos, rope_sin)


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
    prefix_lens: Optional[torch.Tensor],
    rope_cos: Optional[torch.Tensor],
    rope_sin: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    return impl_of(OP, backend)(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side,
                                prefix_lens, rope_cos, rope_sin)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens, rope_cos, rope_sin,
      backend):
    return torch.empty_like(q)


@register_flop_formula(torch.ops.deepencoder_kernels.varlen_attention)
def _flop_formula(q_shape, k_shape, v_shape, cu_shape, max_seqlen, *args, **kwargs) -> int:
    # Lengths are data, not shapes: bound by max_seqlen (exact when all sequences are that long).
    total, heads, d = q_shape
    return 4 * total * max_seqlen * heads * d


dispatch.register(OP, dispatch.Backend("reference", _reference, REFERENCE_DEVICES, FLOAT_DTYPES, custom_op=False))


# CPU: every sequence alone through SDPA (no padding to the longest), the rel-pos bias one block of rows
# at a time, the prefix-LM mask only over the query rows (ops/_sdpa_blocked.py). Forward only. Faster than
# upstream's code on rel-pos and prefix-LM calls and mixed lengths (benchmarks/bench_cpu.py: 1.4x, 2.3x,
# 3.6x, fp32, one thread); a plain equal-length call (upstream CLIP's) is the same single SDPA call: parity.
def _blocked_accepts(q, k, v, cu_seqlens, *rest):
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(cu_seqlens, FakeTensor):   # e.g. a Packing cached by a counting pass, used in a real one
        return "cu_seqlens is a fake tensor: sdpa-blocked reads its values on the host"
    return None


dispatch.register(OP, dispatch.Backend("sdpa-blocked", _sdpa_blocked.varlen_attention, ("cpu",), FLOAT_DTYPES,
                                       accepts=_blocked_accepts, faster_than_upstream=True))


# ---- fused Triton backend --------------------------------------------------------------------

def packed_bias_tables(rel_pos_h, rel_pos_w, grid_hw, max_side: int):
    """Per-sequence rel-pos tables for the kernel, with no host read: each axis's table resized to
    ``2 s - 1`` rows for every side ``s`` in 1..``max_side`` (the reference's interpolation), all
    concatenated (side ``s`` starts at row ``(s - 1)^2``), made at every call from the current
    weights (see ``_common.derived``) in one gather and lerp (:func:`packed_table`); each
    sequence's first rows computed on the device from ``grid_hw``. The same tables serve any grids
    up to ``max_side``, so a captured CUDA graph replays with other grids."""
    tables_h, tables_w = derived((rel_pos_h, rel_pos_w), ("packed", max_side),
                                 lambda: (packed_table(rel_pos_h, max_side), packed_table(rel_pos_w, max_side)))
    grid = grid_hw.clamp(1, max_side)   # a side past max_side (unchecked input) must not read past the tables
    table_rows = (grid - 1).square()
    return grid, tables_h, tables_w, table_rows, max_side, max_side


def packed_table(table: torch.Tensor, max_side: int) -> torch.Tensor:
    """``cat([reference.resize_rel_pos(table, 2 s - 1) for s in 1..max_side])`` as one gather and lerp
    on the table's device: ``F.interpolate``'s linear rule (align_corners=False: source index
    ``(i + 0.5) * L / n - 0.5`` clamped at 0, fp32, cast back) with indices made from ``arange``
    (shapes only; no host data, so it also runs while a CUDA graph captures; within 2 ulp of
    ``F.interpolate``). Sides whose table
    already has ``2 s - 1`` rows read it exactly (weight 0 on the neighbour)."""
    L, dev = table.shape[0], table.device
    k = torch.arange(max_side * max_side, device=dev)
    side = torch.sqrt(k.to(torch.float32)).floor().long() + 1   # row k belongs to side s when (s-1)^2 <= k < s^2
    n = 2 * side - 1
    dst = (k - (side - 1) ** 2).to(torch.float64)
    scale = torch.full_like(dst, float(L), dtype=torch.float32) / n.to(torch.float32)   # fp32, as the kernel's
    # scale * (i + 0.5) - 0.5 rounded once, as the compiled kernels' fused multiply-add does (measured:
    # rounding twice moves a source index across an integer, 1e-5 off; once, within 2 ulp)
    src = (scale.to(torch.float64) * (dst + 0.5) - 0.5).to(torch.float32).clamp_min(0)
    i0 = src.floor().long().clamp_max(L - 1)
    lam = (src - i0.to(torch.float32)).clamp(0, 1)
    lam = torch.where(n == L, torch.zeros_like(lam), lam)[:, None]   # same size: the table as it is
    i1 = (i0 + 1).clamp_max(L - 1)
    t = table.detach().float()
    return (t[i0] * (1 - lam) + t[i1] * lam).to(table.dtype)


def _fused(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens=None, rope_cos=None,
           rope_sin=None, *, interpret: bool):
    from deepencoder_kernels.kernels.varlen_attention import varlen_attention_fwd

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tables = packed_bias_tables(rel_pos_h, rel_pos_w, grid_hw, max_side) if rel_pos_h is not None and grid_hw.shape[0] else None
    return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, tables, interpret=interpret, prefix_lens=prefix_lens,
                                rope=_rope(rope_cos, rope_sin))


def _rope(rope_cos, rope_sin):
    """(cos, sin) as the kernels read them (rows of unit stride, no gradient), or None."""
    if rope_cos is None:
        return None
    return tuple(t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (rope_cos, rope_sin))


def _fused_accepts(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens, rope_cos,
                   rope_sin):
    from .rel_pos_attention import FUSED_HEAD_DIMS

    d = q.shape[-1]
    if d not in FUSED_HEAD_DIMS:
        return f"head_dim {d} not in {FUSED_HEAD_DIMS}"
    if needs_grad(rope_cos, rope_sin):
        return "rope_cos / rope_sin require grad: the fused backward gives q, k, v (and rel-pos table) gradients only"
    return None


triton_backends(OP, _fused, _fused_accepts, differentiable=True)


# ---- training: forward keeping the row logsumexp, fused backward ---------------------------------

def _train_bias(tables_h, tables_w, grid_hw, max_side):
    """The forward's bias tables from the packed ones (the layout of :func:`packed_bias_tables`)."""
    if tables_h is None or not grid_hw.shape[0]:
        return None
    grid = grid_hw.clamp(1, max_side)
    return grid, tables_h.detach(), tables_w.detach(), (grid - 1).square(), max_side, max_side


def _fused_train(q, k, v, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side, prefix_lens, rope_cos, rope_sin,
                 interpret: bool):
    from deepencoder_kernels.kernels.varlen_attention import varlen_attention_fwd

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, _train_bias(tables_h, tables_w, grid_hw, max_side),
                                interpret=interpret, with_lse=True, prefix_lens=prefix_lens, rope=_rope(rope_cos, rope_sin))


def _fused_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side,
                    prefix_lens, rope_cos, rope_sin, interpret: bool):
    from deepencoder_kernels.kernels.varlen_attention_backward import varlen_attention_bwd

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = _train_bias(tables_h, tables_w, grid_hw, max_side)
    if bias is None:
        dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, None, interpret=interpret,
                                          prefix_lens=prefix_lens, rope=_rope(rope_cos, rope_sin))
        if tables_h is None:
            return dq, dk, dv, *(q.new_zeros(0, q.shape[-1], dtype=torch.float32) for _ in range(2))
        return dq, dk, dv, torch.zeros_like(tables_h, dtype=torch.float32), torch.zeros_like(tables_w, dtype=torch.float32)
    # Each slice of dq programs leaves per-program partial table gradients; they are summed per side
    # (program -> sequence -> its grid side) as a matmul with a 0/1 membership matrix: a fixed order,
    # no atomics, sizes from shapes alone.
    heads, d = q.shape[1], q.shape[2]
    sides = torch.arange(1, max_side + 1, device=q.device, dtype=grid_hw.dtype)
    per_side = [None, None]
    programs_per_seq = -(-max_seqlen // varlen_bwd_block_m(max_side)) * heads

    def reduce_parts(parts_h, parts_w, first):
        seq = torch.arange(first, first + parts_h.shape[0], device=q.device) // programs_per_seq
        for axis, parts in enumerate((parts_h, parts_w)):
            member = (bias[0][seq, axis][None, :] == sides[:, None]).to(parts.dtype)   # [max_side, programs]
            total = member @ parts.reshape(parts.shape[0], -1)
            per_side[axis] = total if per_side[axis] is None else per_side[axis] + total

    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, bias, interpret=interpret,
                                      reduce_parts=reduce_parts, prefix_lens=prefix_lens, rope=_rope(rope_cos, rope_sin))
    if per_side[0] is None:   # nothing launched (no tokens)
        return dq, dk, dv, torch.zeros_like(tables_h, dtype=torch.float32), torch.zeros_like(tables_w, dtype=torch.float32)
    packed_row = torch.arange(max_side * max_side, device=q.device)   # side s + 1 starts at row s^2
    s = packed_row.double().sqrt().floor().long()
    grads = []
    for axis in (0, 1):
        lp = per_side[axis].shape[1] // d
        grads.append(per_side[axis].view(max_side * lp, d)[s * lp + packed_row - s * s])
    return dq, dk, dv, grads[0], grads[1]


def varlen_bwd_block_m(max_side: int) -> int:
    from deepencoder_kernels.kernels.configs import varlen_attention_bwd_config

    return varlen_attention_bwd_config(True, max_side, max_side)[0]["BLOCK_M"]


@torch.library.custom_op(f"{LIBRARY}::{OP}_train", mutates_args=())
def _varlen_attention_train_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float],
    tables_h: Optional[torch.Tensor],
    tables_w: Optional[torch.Tensor],
    grid_hw: Optional[torch.Tensor],
    max_side: int,
    prefix_lens: Optional[torch.Tensor],
    rope_cos: Optional[torch.Tensor],
    rope_sin: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward for training: ``(out, lse fp32 [total, heads])``; with the bias, ``tables_*``
    are the packed tables (every side 1..max_side, side ``s`` at row ``(s - 1)^2``)."""
    return _fused_train(q, k, v, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side, prefix_lens, rope_cos,
                        rope_sin, interpret=TRITON_INTERPRET[backend])


@_varlen_attention_train_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side, prefix_lens, rope_cos, rope_sin, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{LIBRARY}::{OP}_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float],
    tables_h: Optional[torch.Tensor],
    tables_w: Optional[torch.Tensor],
    grid_hw: Optional[torch.Tensor],
    max_side: int,
    prefix_lens: Optional[torch.Tensor],
    rope_cos: Optional[torch.Tensor],
    rope_sin: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d tables_h fp32, d tables_w fp32)``; dk, dv ``[total, kv_heads, d]`` (each kv
    head's query group summed in the kernel, fixed order); the table gradients are ``[0, d]`` without
    the bias. RoPE's backward is fused: dq and dk are the gradients of the unrotated q and k."""
    return _fused_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side,
                           prefix_lens, rope_cos, rope_sin, interpret=TRITON_INTERPRET[backend])


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side, prefix_lens, rope_cos, rope_sin,
      backend):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if tables_h is None:
        return (*grads, q.new_empty(0, q.shape[-1], dtype=torch.float32), q.new_empty(0, q.shape[-1], dtype=torch.float32))
    return (*grads, tables_h.new_empty(tables_h.shape, dtype=torch.float32), tables_w.new_empty(tables_w.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, tables_h, tables_w, grid_hw, max_side, prefix_lens, rope_cos, rope_sin, backend = inputs
    out, lse = output
    # O(N) saved state: the inputs, the output and one fp32 logsumexp per (row, head); no scores
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, tables_h, tables_w, grid_hw, prefix_lens, rope_cos, rope_sin)
    ctx.max_seqlen, ctx.scale, ctx.max_side, ctx.backend = max_seqlen, scale, max_side, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, tables_h, tables_w, grid_hw, prefix_lens, rope_cos, rope_sin = ctx.saved_tensors
    dq, dk, dv, dth, dtw = _varlen_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale,
                                                         tables_h, tables_w, grid_hw, ctx.max_side, prefix_lens, rope_cos,
                                                         rope_sin, ctx.backend)
    if tables_h is None:
        dth = dtw = None
    else:
        dth, dtw = dth.to(tables_h.dtype), dtw.to(tables_w.dtype)
    # the RoPE tables get no gradient (the dispatcher refuses the fused backends when they require one)
    return dq, dk, dv, None, None, None, dth, dtw, None, None, None, None, None, None


_varlen_attention_train_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.deepencoder_kernels.varlen_attention_train)
def _train_flop_formula(q_shape, k_shape, v_shape, cu_shape, max_seqlen, *args, **kwargs) -> int:
    return _flop_formula(q_shape, k_shape, v_shape, cu_shape, max_seqlen)


@register_flop_formula(torch.ops.deepencoder_kernels.varlen_attention_backward)
def _backward_flop_formula(dout_shape, q_shape, k_shape, v_shape, out_shape, lse_shape, cu_shape, max_seqlen, *args, **kwargs) -> int:
    return 2 * _flop_formula(q_shape, k_shape, v_shape, cu_shape, max_seqlen)   # the gradients' matmuls, as autograd counts them
