"""Triton's interpreter is chosen when a kernel is decorated (TRITON_INTERPRET=1 before import),
so one process runs either compiled kernels or interpreted ones, never both."""
from __future__ import annotations


def check_mode(kernel, interpret: bool):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction) != interpret:
        want = "TRITON_INTERPRET=1" if interpret else "TRITON_INTERPRET unset"
        raise RuntimeError(f"{kernel.__name__} was decorated in the other Triton mode; run with {want} set before triton is imported")
    return kernel


# CUDA's launch limits: grid x up to 2^31 - 1 blocks, y and z up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def launch_grid(*dims: int) -> tuple[int, ...]:
    """A launch grid, refused with a clear error (not a CUDA launch failure) past CUDA's limits."""
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID)):
        if n > limit:
            raise ValueError(f"launch grid {dims} exceeds CUDA's limit of {limit} blocks on axis {'xyz'[axis]}: "
                             "split the batch into smaller calls")
    return tuple(dims)
