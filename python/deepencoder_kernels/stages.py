"""The encoder's stages, and the default hook that wraps each in an NVTX range.

A stage hook is called as ``hook(name, tokens_in, tokens_out)`` and returns a context manager
around the stage's work; the profiler passes one that counts FLOPs, bytes and time.
"""
from __future__ import annotations

import contextlib

STAGES = ("patch embed", "windowed blocks", "global blocks", "neck+compressor", "CLIP", "projector", "saccades")

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but a stripped install still runs
    _nvtx = None


def nvtx_stage(name: str, tokens_in: int = 0, tokens_out: int = 0):
    """An NVTX range (a no-op without a profiler attached, or without the nvtx package)."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(f"deepencoder/{name}", domain="deepencoder_kernels")
