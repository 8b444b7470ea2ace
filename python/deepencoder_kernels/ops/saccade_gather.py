"""Per-image top-k selection of SAM positions and the gather of their features ("saccades")."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import dispatch, reference
from ._common import FLOAT_DTYPES, LIBRARY, REFERENCE_DEVICES, check_cu_seqlens, check_shape, check_tensor, impl_of, run

OP = "saccade_gather"
ORDERS = ("score", "spatial")


def saccade_gather(
    scores: torch.Tensor,
    features: torch.Tensor,
    k: Union[int, torch.Tensor],
    cu_seqlens: Optional[torch.Tensor] = None,
    order: str = "score",
):
    """Keep each image's ``k[b]`` best-scoring positions and gather their feature rows, packed.

    Args:
        scores: ``[B, N]``, or packed ``[total]`` with ``cu_seqlens``; fp32/fp16/bf16.
        features: ``[B, N, C]``, or packed ``[total, C]``; contiguous; any float dtype.
        k: an int (same budget for every image) or int64 ``[B]``; ``0 <= k[b] <= N_b``.
        cu_seqlens: int32 ``[B + 1]`` offsets of packed inputs (None for ``[B, N]`` inputs).
        order: ``"score"`` (descending score) or ``"spatial"`` (ascending position, reading order).

    Ties go to the lower position. NaN scores rank below every number, so a NaN position is
    chosen only when ``k[b]`` exceeds the image's count of non-NaN scores (then lowest index first).

    Returns:
        ``(gathered [sum k, C], positions int64 [sum k] (index within its image),
        cu_seqlens_out int32 [B + 1])``: the packed layout :func:`varlen_attention` takes.

    Equivalent PyTorch: :func:`deepencoder_kernels.reference.saccade_gather`.
    """
    check_tensor("scores", scores, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    device = scores.device
    check_tensor("features", features, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device)
    if not features.is_contiguous():
        raise ValueError(f"features must be contiguous, got strides {features.stride()} for shape {list(features.shape)}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if cu_seqlens is None:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, N] without cu_seqlens, got shape {list(scores.shape)}")
        B, N = scores.shape
        check_shape("features", features, (B, N, None))
        lengths = torch.full((B,), N, dtype=torch.int64)
    else:
        if scores.dim() != 1:
            raise ValueError(f"scores must be packed [total] with cu_seqlens, got shape {list(scores.shape)}")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got shape {list(cu_seqlens.shape)}")
        check_shape("features", features, (scores.shape[0], None))
        check_cu_seqlens("cu_seqlens", cu_seqlens, scores.shape[0], None)
        B = cu_seqlens.shape[0] - 1
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64).cpu()
    if isinstance(k, bool) or not isinstance(k, (int, torch.Tensor)):
        raise TypeError(f"k must be an int or an int64 tensor, got {type(k).__name__}")
    if isinstance(k, int):
        k = torch.full((B,), k, dtype=torch.int64, device=device)
    check_tensor("k", k, ndim=1, dtypes=(torch.int64,), device=device)
    check_shape("k", k, (B,))
    k_host = k.cpu()
    bad = ((k_host < 0) | (k_host > lengths)).nonzero()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(f"k[{b}] = {int(k_host[b])} is out of range: each k must be in [0, N_b = {int(lengths[b])}]")
    args = (scores, features, k, cu_seqlens, order == "spatial")
    return run(OP, _saccade_gather_op, args, device, scores.dtype)


@torch.library.custom_op(f"{LIBRARY}::{OP}", mutates_args=())
def _saccade_gather_op(
    scores: torch.Tensor,
    features: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    spatial_order: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return impl_of(OP, backend)(scores, features, k, cu_seqlens, spatial_order)


@_saccade_gather_op.register_fake
def _(scores, features, k, cu_seqlens, spatial_order, backend):
    n = torch.library.get_ctx().new_dynamic_size()  # sum(k) is data
    C = features.shape[-1]
    return (
        features.new_empty(n, C),
        scores.new_empty(n, dtype=torch.int64),
        scores.new_empty(k.shape[0] + 1, dtype=torch.int32),
    )


dispatch.register(OP, dispatch.Backend("reference", reference.saccade_gather, REFERENCE_DEVICES, FLOAT_DTYPES, custom_op=False))
