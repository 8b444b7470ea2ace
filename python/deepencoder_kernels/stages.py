"""The encoder's stages, and the default hook that wraps each in an NVTX range.

A stage hook is called as ``hook(name, tokens_in, tokens_out)`` and returns a context manager
around the stage's work; the profiler passes one that counts FLOPs, bytes and time.
"""
from __future__ import annotations

import contextlib

import torch

# v1 runs CLIP after the compressor, DeepEncoder V2 the causal-flow stage (its Qwen2 decoder as encoder)
STAGES = ("patch embed", "windowed blocks", "global blocks", "neck+compressor", "CLIP", "causal flow", "projector", "saccades")

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but a stripped install (a GPU machine's own Python) still runs
    _nvtx = None


@contextlib.contextmanager
def _torch_nvtx_range(message: str):
    torch.cuda.nvtx.range_push(message)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_stage(name: str, tokens_in: int = 0, tokens_out: int = 0):
    """An NVTX range (a no-op without a profiler attached): the ``nvtx`` package's, else
    ``torch.cuda.nvtx``'s on a CUDA build, else nothing. While torch.compile traces, no range (dynamo
    cannot trace either); wrap the compiled call in :func:`nvtx_range` to see it in a profile."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx_range(f"deepencoder/{name}")


def nvtx_range(message: str):
    """An NVTX range around eager code, e.g. a compiled encoder's call."""
    if _nvtx is not None:
        return _nvtx.annotate(message, domain="deepencoder_kernels")
    if torch.cuda.is_available():
        return _torch_nvtx_range(message)
    return contextlib.nullcontext()
