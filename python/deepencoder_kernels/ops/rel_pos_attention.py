"""SAM attention with decomposed relative position, windowed or global."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import dispatch, reference
from . import _sdpa_blocked
from ._common import (FLOAT_DTYPES, LIBRARY, REFERENCE_DEVICES, TRITON_INTERPRET, check_int, check_shape, check_tensor, derived, impl_of,
                      kernel_layout, needs_grad, run, triton_backends)

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
    # the kernel reads qkv through its strides, pad_kv and the tables (when not resized) by pointer
    qkv, pad_kv = kernel_layout(qkv, rows=True), kernel_layout(pad_kv)
    rel_pos_h, rel_pos_w = kernel_layout(rel_pos_h), kernel_layout(rel_pos_w)
    if needs_grad(qkv, rel_pos_h, rel_pos_w, pad_kv):
        # training: resize in plain torch (a no-op at the right length), so autograd differentiates
        # the interpolation exactly as upstream's does and the fused backward returns d(resized table)
        seq_h, seq_w = (window_size, window_size) if window_size else (H, W)
        rel_pos_h = reference.resize_rel_pos(rel_pos_h, 2 * seq_h - 1)
        rel_pos_w = reference.resize_rel_pos(rel_pos_w, 2 * seq_w - 1)
    args = (qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv)
    return run(OP, _call_op, args, qkv.device, qkv.dtype)


def _call_op(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv, backend):
    """The custom op; under autograd its training variant, which also keeps the row logsumexp."""
    if needs_grad(qkv, rel_pos_h, rel_pos_w, pad_kv):
        return _rel_pos_attention_train_op(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv, backend)[0]
    return _rel_pos_attention_op(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv, backend)


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


# ---- CPU backend: SDPA one block of query rows at a time, no dense bias (ops/_sdpa_blocked.py) ----
def _sdpa_blocked_forward(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv):
    """Plain torch ops (no custom op: the profiler's counting pass and FLOP counter see its real
    allocations and matmuls, dynamo traces it); forward only, so autograd runs the reference."""
    if needs_grad(qkv, rel_pos_h, rel_pos_w, pad_kv):
        dispatch.record(OP, "reference", {"sdpa-blocked": ["forward only: autograd needs gradients"]})
        return reference.rel_pos_attention(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv)
    return _sdpa_blocked.rel_pos_attention(qkv, rel_pos_h, rel_pos_w, num_heads, window_size, pad_kv)


# Base, fp32, one thread, CPU seconds vs upstream's attention core (same inputs, interleaved medians):
# global 1.07 vs 1.70, windowed 0.116 vs 0.227; benchmarks/bench_cpu.py measures blocks and whole views.
dispatch.register(OP, dispatch.Backend("sdpa-blocked", _sdpa_blocked_forward, ("cpu",), FLOAT_DTYPES, custom_op=False,
                                       faster_than_upstream=True))


# ---- fused Triton backend --------------------------------------------------------------------
FUSED_HEAD_DIMS = (16, 32, 64, 128)
def sequence_tables(rel_pos_h, rel_pos_w, seq_h: int, seq_w: int):
    """The rel-pos tables resized to ``2 S - 1`` rows (a no-op when they have them), at every call (see ``derived``)."""
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


triton_backends(OP, _fused, _fused_accepts, differentiable=True)


# ---- training: forward keeping the row logsumexp, fused backward ---------------------------------
def _sides(qkv_shape, window_size):
    return (window_size, window_size) if window_size else tuple(qkv_shape[1:3])


def _fused_train(qkv, table_h, table_w, num_heads, window_size, pad_kv, interpret: bool):
    from deepencoder_kernels.kernels.rel_pos_attention import rel_pos_attention_fwd

    seq_h, seq_w = _sides(qkv.shape, window_size)
    table_h = reference.resize_rel_pos(table_h.detach(), 2 * seq_h - 1)   # the public path resized already
    table_w = reference.resize_rel_pos(table_w.detach(), 2 * seq_w - 1)
    return rel_pos_attention_fwd(qkv, table_h, table_w, num_heads, window_size, pad_kv, interpret=interpret, with_lse=True)


def _fused_backward(dout, qkv, table_h, table_w, pad_kv, out, lse, num_heads, window_size, interpret: bool):
    from deepencoder_kernels.kernels.rel_pos_attention_backward import rel_pos_attention_bwd

    dqkv, dth, dtw, dpad = rel_pos_attention_bwd(dout, qkv, table_h, table_w, num_heads, window_size, pad_kv, out, lse,
                                                 interpret=interpret)
    if dpad is None:   # global attention, or no pad_kv: nothing read it
        dpad = torch.zeros(qkv.shape[-1], device=qkv.device, dtype=torch.float32)
    return dqkv, dth, dtw, dpad


@torch.library.custom_op(f"{LIBRARY}::{OP}_train", mutates_args=())
def _rel_pos_attention_train_op(
    qkv: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    num_heads: int,
    window_size: int,
    pad_kv: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward for training: ``(out, lse)``, lse the fp32 ``[B, heads, H, W]`` row logsumexp.
    Tables are ``2 S - 1`` rows long (resized by the caller, differentiably)."""
    return _fused_train(qkv, table_h, table_w, num_heads, window_size, pad_kv, interpret=TRITON_INTERPRET[backend])


@_rel_pos_attention_train_op.register_fake
def _(qkv, table_h, table_w, num_heads, window_size, pad_kv, backend):
    B, H, W, C3 = qkv.shape
    return qkv.new_empty(B, H, W, C3 // 3), qkv.new_empty(B, num_heads, H, W, dtype=torch.float32)


@torch.library.custom_op(f"{LIBRARY}::{OP}_backward", mutates_args=())
def _rel_pos_attention_backward_op(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    pad_kv: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    window_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dqkv, d table_h fp32, d table_w fp32, d pad_kv fp32 [3C])``."""
    return _fused_backward(dout, qkv, table_h, table_w, pad_kv, out, lse, num_heads, window_size,
                           interpret=TRITON_INTERPRET[backend])


@_rel_pos_attention_backward_op.register_fake
def _(dout, qkv, table_h, table_w, pad_kv, out, lse, num_heads, window_size, backend):
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format), table_h.new_empty(table_h.shape, **f32),
            table_w.new_empty(table_w.shape, **f32), qkv.new_empty(qkv.shape[-1], **f32))


def _setup_context(ctx, inputs, output):
    qkv, table_h, table_w, num_heads, window_size, pad_kv, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, table_h, table_w, pad_kv, out, lse)
    ctx.num_heads, ctx.window_size, ctx.backend = num_heads, window_size, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, table_h, table_w, pad_kv, out, lse = ctx.saved_tensors
    dqkv, dth, dtw, dpad = _rel_pos_attention_backward_op(dout, qkv, table_h, table_w, pad_kv, out, lse, ctx.num_heads,
                                                          ctx.window_size, ctx.backend)
    dpad = dpad.to(pad_kv.dtype) if pad_kv is not None else None
    return dqkv, dth.to(table_h.dtype), dtw.to(table_w.dtype), None, None, dpad, None


_rel_pos_attention_train_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.deepencoder_kernels.rel_pos_attention_train)
def _train_flop_formula(qkv_shape, rel_h_shape, rel_w_shape, num_heads, window_size, *args, **kwargs) -> int:
    return flops(qkv_shape, num_heads, window_size)


@register_flop_formula(torch.ops.deepencoder_kernels.rel_pos_attention_backward)
def _backward_flop_formula(dout_shape, qkv_shape, rel_h_shape, rel_w_shape, pad_shape, out_shape, lse_shape, num_heads,
                           window_size, *args, **kwargs) -> int:
    # the gradients' matmuls, twice the forward's (as autograd counts them); the recomputed scores not included
    return 2 * flops(qkv_shape, num_heads, window_size)
