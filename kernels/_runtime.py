"""Triton's interpreter is chosen when a kernel is decorated (TRITON_INTERPRET=1 before import),
so one process runs either compiled kernels or interpreted ones, never both."""
from __future__ import annotations


def check_mode(kernel, interpret: bool):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction) != interpret:
        want = "TRITON_INTERPRET=1" if interpret else "TRITON_INTERPRET unset"
        raise RuntimeError(f"{kernel.__name__} was decorated in the other Triton mode; run with {want} set before triton is imported")
    return kernel
