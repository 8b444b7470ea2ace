"""SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) + the two stride-2 convs."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import config as cfg
from .. import dispatch, reference
from ._common import (FLOAT_DTYPES, LIBRARY, TRITON_INTERPRET, REFERENCE_DEVICES, check_shape, check_tensor, derived, impl_of, kernel_layout,
                      needs_grad, run,
                      triton_backends)

OP = "compress"
WEIGHT_NAMES = ("neck0_w", "neck1_w", "neck1_b", "neck2_w", "neck3_w", "neck3_b", "net2_w", "net3_w")


def compress(
    x: torch.Tensor,
    neck0_w: torch.Tensor,
    neck1_w: torch.Tensor,
    neck1_b: torch.Tensor,
    neck2_w: torch.Tensor,
    neck3_w: torch.Tensor,
    neck3_b: torch.Tensor,
    net2_w: torch.Tensor,
    net3_w: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The compressor from SAM's trunk to CLIP's tokens, reading channels-last.

    Args:
        x: ``[B, H, W, Cin]`` (the trunk's output as it is, 768 channels in DeepEncoder).
        neck0_w: ``[Cn, Cin, 1, 1]``; neck1_w/b: ``[Cn]`` (LayerNorm2d); neck2_w: ``[Cn, Cn, 3, 3]``;
        neck3_w/b: ``[Cn]``; net2_w: ``[C2, Cn, 3, 3]`` (stride 2); net3_w: ``[C3, C2, 3, 3]`` (stride 2).
        eps: LayerNorm2d epsilon (1e-6 upstream).

    Returns:
        Tokens ``[B, h * w, C3]`` row-major, ``h = ceil(ceil(H / 2) / 2)`` (16 x 16 at 1024 px).

    Differentiable in x and all eight parameters on every backend (the fused ones through their own
    backward kernels, deterministic).

    Equivalent PyTorch: :func:`deepencoder_kernels.reference.compress`.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, W, Cin = x.shape
    if min(B, H, W, Cin) < 1:
        raise ValueError(f"x must be a non-empty [B, H, W, C] tensor, got shape {list(x.shape)}")
    weights = (neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w)
    for name, t in zip(WEIGHT_NAMES, weights):
        check_tensor(name, t, dtypes=(x.dtype,), device=x.device)
    check_tensor("neck0_w", neck0_w, ndim=4)
    Cn = neck0_w.shape[0]
    check_shape("neck0_w", neck0_w, (Cn, Cin, 1, 1))
    for name, t in (("neck1_w", neck1_w), ("neck1_b", neck1_b), ("neck3_w", neck3_w), ("neck3_b", neck3_b)):
        check_shape(name, t, (Cn,))
    check_shape("neck2_w", neck2_w, (Cn, Cn, 3, 3))
    check_tensor("net2_w", net2_w, ndim=4)
    check_shape("net2_w", net2_w, (net2_w.shape[0], Cn, 3, 3))
    check_tensor("net3_w", net3_w, ndim=4)
    check_shape("net3_w", net3_w, (net3_w.shape[0], net2_w.shape[0], 3, 3))
    if not isinstance(eps, float) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    # the kernels read x through its strides and the LayerNorm parameters by pointer; conv
    # weights reach them re-laid-out (kkio)
    x = kernel_layout(x, rows=True)
    neck1_w, neck1_b, neck3_w, neck3_b = (kernel_layout(t) for t in (neck1_w, neck1_b, neck3_w, neck3_b))
    weights = (neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w)
    args = (x, *weights, eps)
    return run(OP, _compress_with_grad if needs_grad(*args) else _compress_op, args, x.device, x.dtype)


@torch.library.custom_op(f"{LIBRARY}::{OP}", mutates_args=())
def _compress_op(
    x: torch.Tensor,
    neck0_w: torch.Tensor,
    neck1_w: torch.Tensor,
    neck1_b: torch.Tensor,
    neck2_w: torch.Tensor,
    neck3_w: torch.Tensor,
    neck3_b: torch.Tensor,
    net2_w: torch.Tensor,
    net3_w: torch.Tensor,
    eps: float,
    backend: str,
) -> torch.Tensor:
    return impl_of(OP, backend)(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps)


def out_grid(H: int, W: int) -> tuple[int, int]:
    return cfg.compressed_side(H), cfg.compressed_side(W)   # 3x3, stride 2, pad 1, twice


@_compress_op.register_fake
def _(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps, backend):
    B, H, W, _ = x.shape
    h, w = out_grid(H, W)
    return x.new_empty(B, h * w, net3_w.shape[0])


def flops(x_shape, neck0_shape, net2_shape, net3_shape) -> int:
    """Conv multiply-adds x 2 (LayerNorm's few FLOPs per element are not counted, as for aten)."""
    B, H, W, Cin = x_shape
    Cn, C2, C3 = neck0_shape[0], net2_shape[0], net3_shape[0]
    H2, W2 = cfg.stride2_side(H), cfg.stride2_side(W)
    h, w = out_grid(H, W)
    return 2 * B * (H * W * Cn * Cin + H * W * Cn * Cn * 9 + H2 * W2 * C2 * Cn * 9 + h * w * C3 * C2 * 9)


@register_flop_formula(torch.ops.deepencoder_kernels.compress)
def _flop_formula(x_shape, neck0_shape, n1w, n1b, n2w, n3w, n3b, net2_shape, net3_shape, *args, **kwargs) -> int:
    return flops(x_shape, neck0_shape, net2_shape, net3_shape)


dispatch.register(OP, dispatch.Backend("reference", reference.compress, REFERENCE_DEVICES, FLOAT_DTYPES, custom_op=False))


# ---- fused Triton backend --------------------------------------------------------------------

MAX_LN_CHANNELS = 512  # the LayerNorm convs keep every output channel of a pixel tile on chip


def kkio(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight [C_out, C_in, k, k] -> [k, k, C_in, C_out] for the kernel, at every call (see ``derived``)."""
    return derived((weight,), "kkio", lambda: weight.detach().permute(2, 3, 1, 0).contiguous())


def kernel_weights(neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w) -> tuple:
    """The eight parameters as the kernels take them: the four conv weights through :func:`kkio`."""
    return kkio(neck0_w), neck1_w, neck1_b, kkio(neck2_w), neck3_w, neck3_b, kkio(net2_w), kkio(net3_w)


def _fused(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps, interpret: bool):
    from deepencoder_kernels.kernels.compress import compress_fwd

    return compress_fwd(x, *kernel_weights(neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w),
                        eps, interpret=interpret)


def _fused_accepts(x, neck0_w, *rest):
    c = neck0_w.shape[0]
    return None if c <= MAX_LN_CHANNELS else f"neck channels {c} > {MAX_LN_CHANNELS} (LayerNorm tile on chip)"


triton_backends(OP, _fused, _fused_accepts, differentiable=True)


# ---- training: forward that keeps what the backward needs, backward kernels ------------------------
#
# Saved: x (the caller's tensor, not copied), the two LayerNorm convs' outputs before the norm (c1,
# c2; activation dtype) with each pixel's mean and rstd (fp32, 8 bytes a pixel), and net_2's output
# y3. The normalised y1, y2 are recomputed inside the weight-gradient kernels as they read them, so
# nothing the next conv can rebuild is kept: less than the reference chain, which keeps c, y and the
# LayerNorm's intermediates of both norms. (Saving only x and recomputing the whole chain would keep
# less still, but redo ~80% of the forward's FLOPs in every backward.)

@torch.library.custom_op(f"{LIBRARY}::compress_train", mutates_args=())
def _compress_train_op(
    x: torch.Tensor,
    neck0_w: torch.Tensor,
    neck1_w: torch.Tensor,
    neck1_b: torch.Tensor,
    neck2_w: torch.Tensor,
    neck3_w: torch.Tensor,
    neck3_b: torch.Tensor,
    net2_w: torch.Tensor,
    net3_w: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, c1, stats1, c2, stats2, y3): the forward plus the tensors its backward reads."""
    from deepencoder_kernels.kernels.compress import compress_fwd

    return compress_fwd(x, *kernel_weights(neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w),
                        eps, interpret=TRITON_INTERPRET[backend], train=True)


@_compress_train_op.register_fake
def _(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps, backend):
    B, H, W, _ = x.shape
    h, w = out_grid(H, W)
    Cn = neck0_w.shape[0]
    stats = lambda: x.new_empty(B * H * W, 2, dtype=torch.float32)  # noqa: E731
    return (x.new_empty(B, h * w, net3_w.shape[0]), x.new_empty(B, H, W, Cn), stats(), x.new_empty(B, H, W, Cn), stats(),
            x.new_empty(B, (H + 1) // 2, (W + 1) // 2, net2_w.shape[0]))


@torch.library.custom_op(f"{LIBRARY}::compress_backward", mutates_args=())
def _compress_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    neck0_w: torch.Tensor,
    neck1_w: torch.Tensor,
    neck1_b: torch.Tensor,
    neck2_w: torch.Tensor,
    neck3_w: torch.Tensor,
    neck3_b: torch.Tensor,
    net2_w: torch.Tensor,
    net3_w: torch.Tensor,
    c1: torch.Tensor,
    stats1: torch.Tensor,
    c2: torch.Tensor,
    stats2: torch.Tensor,
    y3: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Gradients of x and the eight parameters, each in its input's shape and dtype."""
    from deepencoder_kernels.kernels.compress import compress_bwd

    return compress_bwd(grad, x, *kernel_weights(neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w),
                        c1, stats1, c2, stats2, y3, interpret=TRITON_INTERPRET[backend])


@_compress_backward_op.register_fake
def _(grad, x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, c1, stats1, c2, stats2, y3, backend):
    return (x.new_empty(x.shape), *(t.new_empty(t.shape) for t in (neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b,
                                                                    net2_w, net3_w)))


def _setup_context(ctx, inputs, output):
    x, *weights, _eps, backend = inputs
    _, c1, stats1, c2, stats2, y3 = output
    ctx.backend = backend
    ctx.mark_non_differentiable(c1, stats1, c2, stats2, y3)
    ctx.set_materialize_grads(False)   # no zero-filled gradients for the saved outputs
    ctx.save_for_backward(x, *weights, c1, stats1, c2, stats2, y3)


def _backward(ctx, grad, *_saved_outputs_grads):
    grads = _compress_backward_op(grad, *ctx.saved_tensors, ctx.backend)
    return (*grads, None, None)


_compress_train_op.register_autograd(_backward, setup_context=_setup_context)


def _compress_with_grad(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps, backend):
    """The op under autograd on a fused backend: the training forward, tokens only."""
    return _compress_train_op(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps, backend)[0]


@register_flop_formula(torch.ops.deepencoder_kernels.compress_train)
def _train_flop_formula(x_shape, neck0_shape, n1w, n1b, n2w, n3w, n3b, net2_shape, net3_shape, *args, **kwargs) -> int:
    return flops(x_shape, neck0_shape, net2_shape, net3_shape)


@register_flop_formula(torch.ops.deepencoder_kernels.compress_backward)
def _backward_flop_formula(grad_shape, x_shape, neck0_shape, n1w, n1b, n2w, n3w, n3b, net2_shape, net3_shape, *args,
                           **kwargs) -> int:
    return 2 * flops(x_shape, neck0_shape, net2_shape, net3_shape)   # input and weight gradients: a forward each
