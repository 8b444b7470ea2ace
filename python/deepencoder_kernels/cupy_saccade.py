"""The CUDA saccade op through CuPy: the kernels of ``csrc/saccade_gather_kernels.cuh`` compiled at
run time by NVRTC, for users with a GPU and CuPy but no build toolchain.

Same semantics as :func:`deepencoder_kernels.ops.saccade_gather` (the ranking rule is
``csrc/saccade_order.h``, shared with the C++ and nvcc builds). Inputs may be CuPy arrays or CUDA
torch tensors (exchanged through DLPack / data pointers); outputs come back in the same kind.
``cupy`` is imported only when this path is used.
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
def _module():
    import cupy

    return cupy.RawModule(code=cuda_source(), options=("--std=c++17",))


def saccade_gather(scores, features, k, cu_seqlens=None, order: str = "score"):
    """CuPy/NVRTC version of the op; arguments and results as in ``ops.saccade_gather``.

    Arrays are checked for kind, shape and range here; the torch path has the fuller checks.
    """
    import cupy

    as_torch = type(scores).__module__.startswith("torch")
    if as_torch:  # bf16 has no CuPy dtype: move the bits as int16 and keep the dtype name
        dtype_name = str(scores.dtype).removeprefix("torch.")
        s = cupy.from_dlpack(scores.detach().contiguous().view(-1).view(_int16_like(scores)))
        f = cupy.from_dlpack(features.detach().contiguous().view(_int16_like(features)))
        kk = cupy.from_dlpack(k.detach().contiguous()) if not isinstance(k, int) else k
        cu = cupy.from_dlpack(cu_seqlens.detach().contiguous()) if cu_seqlens is not None else None
        feature_dtype = features.dtype
    else:
        dtype_name, s, f, kk, cu = str(scores.dtype), scores.ravel(), features, k, cu_seqlens
        feature_dtype = features.dtype
    if dtype_name not in SCORE_DTYPE_CODES:
        raise TypeError(f"scores must be float32, float16 or bfloat16, got {dtype_name}")
    if order not in ("score", "spatial"):
        raise ValueError(f"order must be 'score' or 'spatial', got {order!r}")
    if cu is None:
        B, N = scores.shape[0], scores.shape[1]
        cu = cupy.arange(B + 1, dtype=cupy.int32) * N
    else:
        cu = cu.astype(cupy.int32)
        B = cu.shape[0] - 1
    kk = cupy.full((B,), kk, dtype=cupy.int64) if isinstance(kk, int) else kk.astype(cupy.int64)
    lengths = (cu[1:] - cu[:-1]).astype(cupy.int64)
    if bool(((kk < 0) | (kk > lengths)).any()):
        raise ValueError("each k[b] must be in [0, N_b]")
    total = int(kk.sum())
    C_units = f.shape[-1]
    rows = f.reshape(-1, C_units)
    gathered = cupy.empty((total, C_units), dtype=rows.dtype)
    positions = cupy.empty(total, dtype=cupy.int64)
    sources = cupy.empty(total, dtype=cupy.int64)
    cu_out = cupy.zeros(B + 1, dtype=cupy.int32)
    module = _module()
    if B:
        args = dict(scores=s, score_dtype=cupy.int32(SCORE_DTYPE_CODES[dtype_name]), cu_seqlens=cu,
                    uniform_length=cupy.int64(0), k_per_image=kk, spatial_order=cupy.int32(order == "spatial"),
                    positions=positions, sources=sources, cu_seqlens_out=cu_out)
        module.get_function("saccade_select")((B,), (SELECT_THREADS,), tuple(args[name] for name in SELECT_PARAMS))
    row_bytes = rows.shape[1] * rows.itemsize
    if total and row_bytes:
        unit = next(u for u in (16, 8, 4, 2, 1) if (row_bytes | rows.data.ptr | gathered.data.ptr) % u == 0)
        threads = 256
        module.get_function(f"saccade_gather_rows_{unit}")(
            ((total * 32 + threads - 1) // threads,), (threads,),
            (rows, cupy.int64(row_bytes // unit), sources, cupy.int64(total), gathered))
    if as_torch:
        import torch

        gathered_t = torch.from_dlpack(gathered).view(feature_dtype)
        return gathered_t, torch.from_dlpack(positions), torch.from_dlpack(cu_out)
    return gathered, positions, cu_out


def _int16_like(t):
    import torch

    return {2: torch.int16, 4: torch.int32}[t.element_size()]
