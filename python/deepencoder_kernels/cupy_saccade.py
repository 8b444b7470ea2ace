"""The CUDA saccade op through CuPy: the kernels of ``csrc/saccade_gather_kernels.cuh`` compiled at
run time by NVRTC, for users with a GPU and CuPy but no build toolchain.

Same semantics as :func:`deepencoder_kernels.ops.saccade_gather` (the ranking rule is
``csrc/saccade_order.h``, shared with the C++ and nvcc builds) and the same host path (checks,
layouts, output sizing: ``ops.saccade_gather.run_extension``); only the launches differ, planned by
:func:`launch_plan` as saccade_gather.cu does them. Inputs may be CuPy arrays or CUDA torch tensors
(exchanged through DLPack); outputs come back in the same kind. ``cupy`` is imported only when this
path is used.
"""
from __future__ import annotations

import functools
import importlib.resources
import re

SELECT_THREADS = 256  # DK_SELECT_THREADS in the .cuh
# saccade_select's parameters in the .cuh's order (a test reads them from the source to keep this in step)
SELECT_PARAMS = ("scores", "score_dtype", "cu_seqlens", "uniform_length", "k_per_image", "spatial_order", "positions",
                 "sources", "cu_seqlens_out")
SCORE_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.M)


def cuda_source() -> str:
    """The kernels as one self-contained text (the local header inlined), ready for NVRTC."""
    root = importlib.resources.files("deepencoder_kernels.csrc")
    text = (root / "saccade_gather_kernels.cuh").read_text()
    return _INCLUDE.sub(lambda m: (root / m.group(1)).read_text().replace("#pragma once", ""), text)


def compile_cubin(arch: str = "sm_90") -> bytes:
    """Compile the kernels with NVRTC for ``arch``; needs no GPU (used by CI to check this path)."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(cuda_source(), "saccade_gather_kernels.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", "--std=c++17"])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


@functools.lru_cache(None)
def _module(device: int):
    """The kernels loaded on ``device`` (a module is per device context)."""
    import cupy

    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=cuda_source(), options=("--std=c++17",))
        module.compile()
    return module


GATHER_THREADS = 256  # one warp per output row, 8 rows per block (as saccade_gather.cu)
MAX_GRID_X = 2**31 - 1


def launch_plan(scores, score_dtype, cu_seqlens, uniform_length, k, num_images, total_in, total_out, features, row_bytes,
                spatial_order, gathered, positions, sources, cu_seqlens_out):
    """What saccade_gather.cu's host code does, as data: ``[("memset", pointer, bytes)]`` or
    ``[(kernel name, grid, block, args), ...]``, with every argument a fixed-width NumPy scalar
    (pointers as uint64, sizes as int64: offsets never pass through int32). Takes the C++ entry
    point's arguments in its order (the op's ``run_extension`` makes them); pure, so it is tested
    without a GPU."""
    import numpy as np

    if num_images == 0:   # no block runs: cu_seqlens_out = [0]
        return [("memset", np.uint64(cu_seqlens_out), 4)]
    if num_images > MAX_GRID_X:
        raise ValueError(f"saccade_gather: {num_images} images exceed CUDA's grid limit ({MAX_GRID_X} blocks)")
    select = dict(scores=np.uint64(scores), score_dtype=np.int32(score_dtype), cu_seqlens=np.uint64(cu_seqlens),
                  uniform_length=np.int64(uniform_length), k_per_image=np.uint64(k), spatial_order=np.int32(bool(spatial_order)),
                  positions=np.uint64(positions), sources=np.uint64(sources), cu_seqlens_out=np.uint64(cu_seqlens_out))
    plan = [("saccade_select", (int(num_images),), (SELECT_THREADS,), tuple(select[name] for name in SELECT_PARAMS))]
    if total_out and row_bytes:
        unit = next(u for u in (16, 8, 4, 2, 1) if (row_bytes | features | gathered) % u == 0)
        blocks = (int(total_out) * 32 + GATHER_THREADS - 1) // GATHER_THREADS
        if blocks > MAX_GRID_X:
            raise ValueError(f"saccade_gather: {total_out} rows exceed CUDA's grid limit")
        plan.append((f"saccade_gather_rows_{unit}", (blocks,), (GATHER_THREADS,),
                     (np.uint64(features), np.int64(row_bytes // unit), np.uint64(sources), np.int64(total_out),
                      np.uint64(gathered))))
    return plan


def saccade_gather(scores, features, k, cu_seqlens=None, order: str = "score"):
    """CuPy/NVRTC version of the op; arguments and results as in ``ops.saccade_gather``.

    Inputs may be CUDA torch tensors or CuPy arrays (exchanged through DLPack, no copy); bf16 only as
    torch tensors (CuPy has no bf16). The host path is the op's own (``ops.saccade_gather.run_extension``:
    the same checks, contiguous layouts before any pointer is taken, the range check in the one
    host read that sizes the outputs); the kernels run on the inputs' device, on torch's current
    stream there.
    """
    import importlib

    import cupy
    import torch

    from .ops._common import check_tensor

    ops_saccade = importlib.import_module("deepencoder_kernels.ops.saccade_gather")
    as_torch = isinstance(scores, torch.Tensor)
    to_torch = (lambda a: a) if as_torch else (lambda a: a if a is None or isinstance(a, int) else torch.from_dlpack(a))  # noqa: E731
    scores, features, k, cu_seqlens = (to_torch(a) for a in (scores, features, k, cu_seqlens))
    if order not in ("score", "spatial"):
        raise ValueError(f"order must be 'score' or 'spatial', got {order!r}")
    check_tensor("scores", scores, ndim=(1, 2), dtypes=tuple(ops_saccade.SCORE_DTYPE_CODES))
    if scores.device.type != "cuda":
        raise ValueError(f"scores must be on a CUDA device for the CuPy path, got {scores.device}")
    with torch.no_grad():
        # the op's argument checks (shapes: cu[0] == 0, cu[-1] == len(scores), feature rows == scores,
        # 0 <= k[b] <= N_b), then the shared host path with CuPy launching
        args = _checked_args(ops_saccade, scores, features, k, cu_seqlens)
        device = scores.device.index if scores.device.index is not None else torch.cuda.current_device()
        torch_stream = torch.cuda.current_stream(scores.device)

        def launch(*call):
            with cupy.cuda.Device(device), _external_stream(cupy, torch_stream, device):
                for step in launch_plan(*call):
                    if step[0] == "memset":
                        cupy.cuda.runtime.memsetAsync(int(step[1]), 0, step[2], cupy.cuda.get_current_stream().ptr)
                    else:
                        name, grid, block, kernel_args = step
                        _module(device).get_function(name)(grid, block, kernel_args)
            return 0

        gathered, positions, cu_out = ops_saccade.run_extension(*args, order == "spatial", launch, checks_values=False)
    if as_torch:
        return gathered, positions, cu_out
    return cupy.from_dlpack(gathered), cupy.from_dlpack(positions), cupy.from_dlpack(cu_out)


def _checked_args(ops_saccade, scores, features, k, cu_seqlens):
    """The op's own argument checks, on the same device; returns contiguous (scores, features, k, cu)."""
    import torch

    from .ops._common import check_shape, check_tensor, kernel_layout

    device = scores.device
    check_tensor("features", features, ndim=(2, 3), dtypes=tuple(ops_saccade.SCORE_DTYPE_CODES), device=device)
    if cu_seqlens is None:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, N] without cu_seqlens, got shape {list(scores.shape)}")
        check_shape("features", features, (*scores.shape, None))
        B = scores.shape[0]
    else:
        if scores.dim() != 1:
            raise ValueError(f"scores must be packed [total] with cu_seqlens, got shape {list(scores.shape)}")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got shape {list(cu_seqlens.shape)}")
        check_shape("features", features, (scores.shape[0], None))
        B = cu_seqlens.shape[0] - 1
    if isinstance(k, bool) or not isinstance(k, (int, torch.Tensor)):
        raise TypeError(f"k must be an int or an int64 array, got {type(k).__name__}")
    if isinstance(k, int):
        k = torch.full((B,), k, dtype=torch.int64, device=device)
    check_tensor("k", k, ndim=1, dtypes=(torch.int64,), device=device)
    check_shape("k", k, (B,))
    return tuple(kernel_layout(t) for t in (scores, features, k, cu_seqlens))


def _external_stream(cupy, torch_stream, device: int):
    """torch's stream as CuPy's current stream (the CUDA stream protocol where CuPy has it)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device)
