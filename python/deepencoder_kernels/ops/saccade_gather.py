"""Per-image top-k selection of SAM positions and the gather of their features ("saccades")."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import dispatch, extension, reference
from ._common import (FLOAT_DTYPES, LIBRARY, REFERENCE_DEVICES, capturing, check_cu_seqlens, check_shape, check_tensor, impl_of,
                      kernel_layout, run)

OP = "saccade_gather"
ORDERS = ("score", "spatial")
SCORE_GRADS = ("none", "straight_through")
# score dtype -> the C++/CUDA code's ScoreDtype (csrc/saccade_order.h)
SCORE_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def saccade_gather(
    scores: torch.Tensor,
    features: torch.Tensor,
    k: Union[int, torch.Tensor],
    cu_seqlens: Optional[torch.Tensor] = None,
    order: str = "score",
    score_grad: str = "none",
):
    """Keep each image's ``k[b]`` best-scoring positions and gather their feature rows, packed.

    Args:
        scores: ``[B, N]``, or packed ``[total]`` with ``cu_seqlens``; fp32/fp16/bf16.
        features: ``[B, N, C]``, or packed ``[total, C]``; fp32/fp16/bf16. Any view of tensors
            (the kernels read a contiguous copy of a non-contiguous one).
        k: an int (same budget for every image) or int64 ``[B]``; ``0 <= k[b] <= N_b``.
        cu_seqlens: int32 ``[B + 1]`` offsets of packed inputs (None for ``[B, N]`` inputs).
        order: ``"score"`` (descending score) or ``"spatial"`` (ascending position, reading order).
        score_grad: ``"none"``: the selection is not differentiable, only ``features`` get
            gradients (a scatter-add of the output gradient into the chosen rows).
            ``"straight_through"``: each gathered row is multiplied by ``1 + s - s.detach()``
            (exactly 1 in the forward), so ``scores`` get ``<grad_row, row>`` at chosen positions.

    An int ``k`` with ``[B, N]`` inputs makes the call capturable in a CUDA graph: the output size
    ``B * k`` is known on the host, so nothing is read back. A tensor ``k`` (or packed inputs) sizes
    the output by ``sum(k)``, one host read (refused with a clear error while a graph captures).

    Ties go to the lower position. NaN scores rank below every number (-inf included), so a NaN
    position is chosen only when ``k[b]`` exceeds the image's count of non-NaN scores (then lowest
    index first). ``+0`` and ``-0`` are equal.

    Returns:
        ``(gathered [sum k, C], positions int64 [sum k] (index within its image),
        cu_seqlens_out int32 [B + 1])``: the packed layout :func:`varlen_attention` takes (with
        ``allow_empty=True`` when some ``k[b]`` is 0).

    Equivalent PyTorch: :func:`deepencoder_kernels.reference.saccade_gather`.
    """
    check_tensor("scores", scores, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    device = scores.device
    check_tensor("features", features, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device)
    scores, features = kernel_layout(scores), kernel_layout(features)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if score_grad not in SCORE_GRADS:
        raise ValueError(f"score_grad must be one of {SCORE_GRADS}, got {score_grad!r}")
    if cu_seqlens is None:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, N] without cu_seqlens, got shape {list(scores.shape)}")
        B, N = scores.shape
        check_shape("features", features, (B, N, None))
    else:
        if scores.dim() != 1:
            raise ValueError(f"scores must be packed [total] with cu_seqlens, got shape {list(scores.shape)}")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
        cu_seqlens = kernel_layout(cu_seqlens)
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got shape {list(cu_seqlens.shape)}")
        check_shape("features", features, (scores.shape[0], None))
        B = cu_seqlens.shape[0] - 1
    if isinstance(k, bool) or not isinstance(k, (int, torch.Tensor)):
        raise TypeError(f"k must be an int or an int64 tensor, got {type(k).__name__}")
    total = -1   # sum(k) when the host knows it (no read back), else -1
    if isinstance(k, int):
        if cu_seqlens is None:
            if not 0 <= k <= scores.shape[1]:
                raise ValueError(f"k[0] = {k} is out of range: each k must be in [0, N_b = {scores.shape[1]}] "
                                 "(an int k is every image's budget)")
            total = B * k
        k = torch.full((B,), k, dtype=torch.int64, device=device)
    check_tensor("k", k, ndim=1, dtypes=(torch.int64,), device=device)
    check_shape("k", k, (B,))
    k = kernel_layout(k)
    if total < 0 and capturing(device):
        raise ValueError("saccade_gather with a tensor k (or packed inputs) sizes its output by sum(k), read to the host, "
                         "which a CUDA graph cannot capture: pass k as an int with [B, N] inputs")
    if total < 0 and not torch.compiler.is_compiling():  # value checks read to the host: eager only, no graph break
        _check_values(scores, k, cu_seqlens)
    args = (scores, features, k, cu_seqlens, order == "spatial", total)
    gathered, positions, cu_out = run(OP, _saccade_gather_op, args, device, scores.dtype)
    if score_grad == "straight_through" and scores.requires_grad and torch.is_grad_enabled():
        chosen = scores.reshape(-1)[source_rows(positions, cu_out, cu_seqlens, scores.shape[-1])]
        gathered = gathered * (chosen - chosen.detach() + 1).to(gathered.dtype).unsqueeze(-1)
    return gathered, positions, cu_out


def _check_values(scores: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> None:
    if cu_seqlens is None:
        lo, hi = (int(v) for v in torch.aminmax(k)) if k.numel() else (0, 0)
        if 0 <= lo and hi <= scores.shape[1]:
            return
        lengths = [scores.shape[1]] * k.shape[0]
    else:
        lengths = check_cu_seqlens("cu_seqlens", cu_seqlens, scores.shape[0], None)
    for b, (kb, n) in enumerate(zip(k.tolist(), lengths)):
        if not 0 <= kb <= n:
            raise ValueError(f"k[{b}] = {kb} is out of range: each k must be in [0, N_b = {n}]")


def source_rows(positions: torch.Tensor, cu_out: torch.Tensor, cu_seqlens: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Row of each gathered position in the flattened (packed) inputs."""
    counts = (cu_out[1:] - cu_out[:-1]).to(torch.int64)
    if cu_seqlens is None:
        starts = torch.arange(counts.shape[0], device=positions.device, dtype=torch.int64) * n
    else:
        starts = cu_seqlens[:-1].to(torch.int64)
    return positions + torch.repeat_interleave(starts, counts, output_size=positions.shape[0])


@torch.library.custom_op(f"{LIBRARY}::{OP}", mutates_args=())
def _saccade_gather_op(
    scores: torch.Tensor,
    features: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    spatial_order: bool,
    total: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return impl_of(OP, backend)(scores, features, k, cu_seqlens, spatial_order, total)


@_saccade_gather_op.register_fake
def _(scores, features, k, cu_seqlens, spatial_order, total, backend):
    n = total if total >= 0 else torch.library.get_ctx().new_dynamic_size()  # else sum(k) is data
    C = features.shape[-1]
    return (
        features.new_empty(n, C),
        scores.new_empty(n, dtype=torch.int64),
        scores.new_empty(k.shape[0] + 1, dtype=torch.int32),
    )


def _setup_context(ctx, inputs, output):
    scores, features, _, cu_seqlens, _, _, _ = inputs
    _, positions, cu_out = output
    ctx.features_shape = features.shape
    ctx.n = scores.shape[-1]
    ctx.save_for_backward(positions, cu_out, cu_seqlens)


def _backward(ctx, grad_gathered, _grad_positions, _grad_cu):
    positions, cu_out, cu_seqlens = ctx.saved_tensors
    rows = source_rows(positions, cu_out, cu_seqlens, ctx.n)
    C = ctx.features_shape[-1]
    grad = grad_gathered.new_zeros(ctx.features_shape).view(-1, C)
    grad.index_add_(0, rows, grad_gathered)  # rows are distinct within an image, and images do not overlap
    return None, grad.view(ctx.features_shape), None, None, None, None, None


_saccade_gather_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the C++ extension backend -------------------------------------------------------------------


def _extension_serves(scores, *_args) -> str | None:
    if not hasattr(extension.EXTENSION, f"saccade_gather_{scores.device.type}"):
        return "the C++ extension was built without CUDA (rebuild with DEEPENCODER_KERNELS_CUDA=1)"
    return None


# Refusals returned by the extension (csrc/saccade_gather.h, SaccadeStatus); positive codes are cudaError_t.
BAD_OFFSETS, BAD_BUDGET, BAD_TOTAL, WRONG_DEVICE = -1, -2, -3, -4
MAX_ROWS = 2**31 - 1   # cu_seqlens_out is int32


def _saccade_gather_cpp(scores, features, k, cu_seqlens, spatial_order, total=-1):
    if scores.device.type == "cuda":
        index = scores.device.index if scores.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(scores.device).cuda_stream   # torch's current stream on that device
        launch = lambda *call: extension.EXTENSION.saccade_gather_cuda(*call, stream, index)  # noqa: E731
        return run_extension(scores, features, k, cu_seqlens, spatial_order, launch, checks_values=False, total=total)
    return run_extension(scores, features, k, cu_seqlens, spatial_order, extension.EXTENSION.saccade_gather_cpu,
                         checks_values=True, total=total)


def _saccade_gather_reference(scores, features, k, cu_seqlens, spatial_order, total=-1):
    return reference.saccade_gather(scores, features, k, cu_seqlens, spatial_order)


def run_extension(scores, features, k, cu_seqlens, spatial_order, launch, checks_values: bool, total: int = -1):
    """The extension's host path on tensors: checks, layouts, outputs, the raw call, its status.

    The custom op runs this also where the ops layer's checks did not run (under torch.compile, or
    called directly), so devices, dtypes, shapes and layouts are checked again here (cheap), and the
    values the kernels rely on are checked on every call: by the C++ code itself on CPU
    (``checks_values``), else together with ``sum(k)`` in the one host read that sizing the outputs
    needs anyway (CUDA; the kernel also clamps budgets, so it never selects past an image).
    ``total >= 0`` is ``sum(k)`` known on the host (an int budget over ``[B, N]`` inputs, checked by
    the caller): then nothing is read back, and the call is capturable in a CUDA graph."""
    device = scores.device
    scores, features, k, cu_seqlens = (kernel_layout(t) for t in (scores, features, k, cu_seqlens))
    for name, t in (("features", features), ("k", k), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != device:
            raise ValueError(f"saccade_gather: {name} is on {t.device} but scores are on {device}: one device for all inputs")
    B = k.shape[0]
    total_in = scores.shape[0] if cu_seqlens is not None else scores.numel()
    if (scores.dtype not in SCORE_DTYPE_CODES or features.dtype not in SCORE_DTYPE_CODES or k.dtype != torch.int64 or k.dim() != 1
            or (cu_seqlens is None) != (scores.dim() == 2) or features.dim() != scores.dim() + 1
            or features.shape[:-1] != scores.shape
            or (cu_seqlens is not None and (cu_seqlens.dtype != torch.int32 or cu_seqlens.shape != (B + 1,)))
            or (cu_seqlens is None and scores.shape[0] != B)):
        raise ValueError("saccade_gather: inputs do not match the op's schema (use deepencoder_kernels.ops.saccade_gather, "
                         "which names what is wrong)")
    if total >= 0 and not checks_values:
        pass   # the host knows sum(k) and the budgets are in range: no read back
    elif checks_values:
        total = int(k.sum()) if total < 0 else total   # the C++ code checks the budgets against it
    else:
        if cu_seqlens is None:
            lengths = torch.full_like(k, scores.shape[1])
            bad_offsets = torch.zeros((), dtype=torch.bool, device=device)
        else:
            offsets = cu_seqlens.to(torch.int64)
            lengths = offsets[1:] - offsets[:-1]
            bad_offsets = (offsets[0] != 0) | (offsets[-1] != total_in) | (lengths < 0).any()
        bad_budget = ((k < 0) | (k > lengths)).any()
        total, bad_offsets, bad_budget = torch.stack([k.sum(), bad_offsets.long(), bad_budget.long()]).tolist()
        if bad_offsets or bad_budget:
            _raise_for(BAD_OFFSETS if bad_offsets else BAD_BUDGET, scores, k, cu_seqlens)
    if total > MAX_ROWS:
        raise ValueError(f"saccade_gather: sum(k) = {total} rows do not fit the int32 cu_seqlens_out (at most {MAX_ROWS})")
    C = features.shape[-1]
    gathered = features.new_empty(max(total, 0), C)
    positions = torch.empty(max(total, 0), device=device, dtype=torch.int64)
    sources = torch.empty(max(total, 0), device=device, dtype=torch.int64)
    cu_out = torch.empty(B + 1, device=device, dtype=torch.int32)
    status = launch(scores.data_ptr(), SCORE_DTYPE_CODES[scores.dtype], 0 if cu_seqlens is None else cu_seqlens.data_ptr(),
                    scores.shape[1] if cu_seqlens is None else 0, k.data_ptr(), B, total_in, max(total, 0), features.data_ptr(),
                    C * features.element_size(), spatial_order, gathered.data_ptr(), positions.data_ptr(), sources.data_ptr(),
                    cu_out.data_ptr())
    if status:
        _raise_for(status, scores, k, cu_seqlens)
    return gathered, positions, cu_out


def _raise_for(status: int, scores, k, cu_seqlens):
    if status in (BAD_OFFSETS, BAD_BUDGET, BAD_TOTAL):
        _check_values(scores, k, cu_seqlens)   # raises, naming the image (an error path may read to the host)
        raise ValueError(f"saccade_gather: k or cu_seqlens out of range (status {status})")
    if status == WRONG_DEVICE:
        raise ValueError(f"saccade_gather: an input or output is not memory of {scores.device}: one device for all tensors")
    name = extension.EXTENSION.cuda_error_string(status) if hasattr(extension.EXTENSION, "cuda_error_string") else ""
    raise RuntimeError(f"saccade_gather CUDA launch failed with cudaError {status} {name}".rstrip())


dispatch.register(OP, dispatch.Backend("reference", _saccade_gather_reference, REFERENCE_DEVICES, FLOAT_DTYPES, custom_op=False))
dispatch.register(OP, dispatch.Backend("cpp", _saccade_gather_cpp, ("cpu", "cuda"), FLOAT_DTYPES, (extension.missing,),
                                       accepts=_extension_serves, differentiable=True))
