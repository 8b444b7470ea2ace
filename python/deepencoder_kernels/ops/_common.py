"""Argument checks and the call path shared by every op.

Checks raise ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device, layout or
value) naming the argument, what was expected and what came.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import dispatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LIBRARY = "deepencoder_kernels"
REFERENCE_DEVICES = ("cpu", "cuda", "meta")  # plain torch runs anywhere; meta counts FLOPs


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if last_dim_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")
    return t


def kernel_layout(t: torch.Tensor | None, *, rows: bool = False) -> torch.Tensor | None:
    """``t`` as a kernel that takes its raw pointer reads it: dense row-major, or with ``rows`` unit
    stride in the last dim only (the kernel takes the other strides), with no lazy negation bit.

    Kernels read memory, not the logical view: a strided, expanded (stride 0) or offset view of the
    same values would be read as other values. Every tensor whose pointer reaches a kernel goes
    through here *before* its values are checked, so the values checked are the values read. A
    no-op for tensors already so laid out; otherwise one copy (autograd flows through it)."""
    if t is None:
        return None
    t = t.resolve_neg()   # itself when no negation bit; unconditional so dynamo traces it (is_neg() it cannot)
    ok = (t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1) if rows else t.is_contiguous()
    return t if ok else t.contiguous()


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """``expected`` may hold None for a free dim."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_cu_seqlens(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None,
                     allow_empty: bool = True) -> list[int]:
    """Value checks (first 0, non-decreasing, last = total, max <= max_seqlen, no empty sequence
    unless ``allow_empty``); reads to the host once and returns the sequence lengths."""
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    bad = [i for i, n in enumerate(lengths) if n < 0]
    if bad:
        raise ValueError(f"{name} must be non-decreasing; sequence {bad[0]} has length {lengths[bad[0]]}")
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty and not allow_empty:
        raise ValueError(f"{name} holds an empty sequence (sequence {empty[0]}: {name}[{empty[0]}] == {name}[{empty[0] + 1}] "
                         f"== {values[empty[0]]}); pass allow_empty=True if empty sequences are intended (they produce nothing)")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed token count {total}, got {values[-1]}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({max(lengths)})")
    return lengths


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph: no host reads then (checks that read
    values are skipped; the values are the replay's anyway)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def run(op: str, custom_op: Callable, args: tuple, device: torch.device, dtype: torch.dtype):
    """Pick the backend and call it.

    The reference runs as plain torch ops (so autograd, FlopCounterMode and memory tracking see
    its inner work, as they would upstream's). Fused backends run through the registered custom
    op, which is opaque to torch.compile and carries a fake implementation. Forward-only fused
    backends hand over to the reference when autograd needs gradients.
    """
    chosen = dispatch.select(op, device, dtype, args)
    if not chosen.custom_op:
        return chosen.impl(*args)
    grad = needs_grad(*args)
    if grad and not chosen.differentiable:
        reference = next(b for b in dispatch.backends_of(op) if b.name == "reference")
        dispatch.record(op, "reference", {chosen.name: ["forward only: autograd needs gradients"]})
        return reference.impl(*args)
    if not grad and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None:
        # plain eager inference: the custom op would only forward to the implementation (~10 us
        # of dispatch). Compiling, autograd and dispatch modes (FLOP counting, fake tensors) see the op.
        return chosen.impl(*args)
    return custom_op(*args, chosen.name)


# Whether each Triton backend runs its kernels through the interpreter: the ``interpret`` argument
# of every launcher, also for the training custom ops that receive the backend's name.
TRITON_INTERPRET = {"triton": False, "triton-interpret": True}


def triton_backends(op: str, launcher: Callable, accepts: Callable | None = None, differentiable: bool = False) -> None:
    """Register a Triton kernel as the ``triton`` (CUDA) and ``triton-interpret`` (CPU) backends.

    ``launcher(*op_args, interpret=bool)`` runs the kernel; the interpreter runs the very same
    source on CPU tensors, which is how the kernels are checked on machines without a GPU.
    ``differentiable``: the op's custom op has a registered backward for these backends.
    """
    import functools

    dispatch.register(op, dispatch.Backend(
        "triton", functools.partial(launcher, interpret=TRITON_INTERPRET["triton"]), ("cuda",), FLOAT_DTYPES,
        (dispatch.needs_triton_compiler, dispatch.needs_interpret(False)), accepts=accepts, differentiable=differentiable))
    dispatch.register(op, dispatch.Backend(
        "triton-interpret", functools.partial(launcher, interpret=TRITON_INTERPRET["triton-interpret"]), ("cpu",), FLOAT_DTYPES,
        (dispatch.needs_module("triton"), dispatch.needs_interpret(True)), accepts=accepts, differentiable=differentiable))


def impl_of(op: str, backend_name: str) -> Callable:
    """The implementation a custom op forwards to, by backend name (noted for ``last_backends``:
    under torch.compile this is where the choice traced into the graph is seen running).

    Compiled code is guarded on the backend per thread, not per asyncio task: if this call's own
    context asks for another kind than the one traced in (another task's ``with dk.backend`` open
    across an ``await`` in this thread), the requested backend runs instead."""
    wanted = dispatch.requested_kind()
    if wanted not in ("auto", backend_name) and not torch.compiler.is_compiling():
        return lambda *args: _run_requested(op, args)
    for b in dispatch.backends_of(op):
        if b.name == backend_name:
            dispatch.record_run(op, backend_name)
            return b.impl
    raise ValueError(f"{op} has no backend {backend_name!r}")


def _run_requested(op: str, args: tuple):
    chosen = dispatch.select(op, args[0].device, args[0].dtype, args)   # records it
    return chosen.impl(*args)


def derived(sources: Sequence[torch.Tensor], extra: Hashable, make: Callable):
    """``make()``: a tensor a kernel needs derived from weights (re-laid-out, resized), made on the
    device at every call, never cached. A cache keyed on the sources' identity, version counter or
    address goes stale silently: ``param.data.copy_(t)`` and ``param.data = t`` (how vLLM's weight
    loaders and trainers syncing weights into a server write) bump no version counter, and checking
    a cache by content would read the weights anyway (and sync the host). The derivations are one
    copy or a few small kernels, cheap next to the op that reads them. ``sources`` and ``extra``
    name what the value depends on (kept so callers read the same)."""
    return make()
