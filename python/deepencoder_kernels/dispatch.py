"""Which implementation runs an op, and why the others did not.

Backends declare what they support as data (devices, dtypes, what must be importable); the
dispatcher takes the first backend of the requested kind with no reason against it, or raises
listing every backend's reasons. The requested kind comes from ``with dk.backend(...)`` (per thread
and asyncio task) or the ``DEEPENCODER_KERNELS_BACKEND`` environment variable (default ``auto``).

Kinds: ``reference`` (plain PyTorch, anywhere), ``triton`` (compiled kernels, CUDA tensors),
``triton-interpret`` (the same kernels through Triton's CPU interpreter, for tests), ``cpp``
(the C++ extension; CPU, or CUDA when built with CUDA), ``sdpa-blocked`` (CPU attention through
torch's SDPA one block of query rows at a time: no dense rel-pos bias or prefix-LM mask, see
``ops/_sdpa_blocked.py``), ``auto`` (the fastest usable one, in :data:`AUTO_ORDER`).

Each backend also says whether it beats upstream's own PyTorch code for its op on its devices
(:attr:`Backend.faster_than_upstream`: every backend but the reference unless it declares otherwise,
from measurements); :func:`faster_than_upstream` asks it of the backend a call would run, and
``accelerate()`` reads it to leave a part on its original forward where nothing faster exists.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

KINDS = ("auto", "reference", "triton", "triton-interpret", "cpp", "sdpa-blocked")
ENV_VAR = "DEEPENCODER_KERNELS_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of one op and what it can run on."""

    name: str                                  # one of KINDS except "auto"
    impl: Callable                             # called with the op's validated arguments
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    requires: tuple[Callable[[], str | None], ...] = ()   # each returns a reason or None
    custom_op: bool = True                     # False: traced as plain torch ops (the reference)
    accepts: Callable[..., str | None] | None = None    # input-dependent limits: args -> reason or None
    differentiable: bool = False               # its custom op has a backward; else autograd -> reference
    # Beats upstream's plain-PyTorch code for this op on its devices: a bool, or a callable
    # ``(device, dtype) -> bool``. Default (None): every backend but the reference (which reproduces
    # upstream's math, so never beats it); a backend declares False where measurements say otherwise.
    # accelerate() reads it to keep a part's original forward where nothing faster exists.
    faster_than_upstream: bool | Callable[[torch.device, torch.dtype], bool] | None = None

    def __post_init__(self):
        if self.faster_than_upstream is None:
            object.__setattr__(self, "faster_than_upstream", self.name != "reference")

    def reasons(self, device: torch.device, dtype: torch.dtype, args: tuple | None = None) -> list[str]:
        out = []
        if device.type not in self.devices:
            out.append(f"device {device.type} not in {self.devices}")
        if dtype not in self.dtypes:
            out.append(f"dtype {dtype} not in {[str(d) for d in self.dtypes]}")
        out.extend(r for r in (req() for req in self.requires) if r)
        if not out and args is not None and self.accepts is not None:
            reason = self.accepts(*args)
            if reason:
                out.append(reason)
        return out

    def beats_upstream(self, device: torch.device, dtype: torch.dtype) -> bool:
        """:attr:`faster_than_upstream` on ``device`` for ``dtype``."""
        flag = self.faster_than_upstream
        return bool(flag(device, dtype)) if callable(flag) else bool(flag)


@dataclass
class Choice:
    """What ran an op call: the backend, and each refused backend with its reasons."""

    op: str
    backend: str
    refused: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        why = "; ".join(f"{b}: {', '.join(r)}" for b, r in self.refused.items())
        return f"{self.op} -> {self.backend}" + (f" (not used: {why})" if why else "")


_REGISTRY: dict[str, list[Backend]] = {}
# The requested kind and the record of what ran belong to the calling thread / asyncio task
# (context variables: a server pinning "reference" in one request never changes another's).
# torch.compile cannot trace ContextVar.get, so the kind is mirrored in a thread-local that dynamo
# reads while tracing and guards on per call (a graph traced under one kind is not reused under
# another in the same thread); the custom ops record what ran when they run.
_REQUESTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("deepencoder_kernels_backend", default=None)
_LAST: contextvars.ContextVar[dict[str, Choice] | None] = contextvars.ContextVar("deepencoder_kernels_last", default=None)


class _TracedKind(threading.local):
    kind: str | None = None


_TRACED = _TracedKind()


def register(op: str, backend: Backend) -> None:
    _REGISTRY.setdefault(op, []).append(backend)


def backends_of(op: str) -> list[Backend]:
    return list(_REGISTRY.get(op, ()))


def requested_kind() -> str:
    kind = _TRACED.kind if torch.compiler.is_compiling() else _REQUESTED.get()
    kind = kind or os.environ.get(ENV_VAR, "auto")
    if kind not in KINDS:
        raise ValueError(f"backend must be one of {KINDS}, got {kind!r} (from {ENV_VAR} or dk.backend)")
    return kind


@contextlib.contextmanager
def backend(kind: str):
    """Run the ops inside the block on ``kind`` (one of :data:`KINDS`); an op that cannot run there
    raises, listing the reasons."""
    if kind not in KINDS:
        raise ValueError(f"backend must be one of {KINDS}, got {kind!r}")
    token = _REQUESTED.set(kind)
    _TRACED.kind = kind
    try:
        yield
    finally:
        _REQUESTED.reset(token)
        _TRACED.kind = _REQUESTED.get()


# Order in which ``auto`` tries backends on each device: fused first, the oracle last.
AUTO_ORDER = {
    "cuda": ("triton", "cpp", "reference"),  # triton-interpret only when asked: it is slow
    "cpu": ("cpp", "sdpa-blocked", "reference"),
}


def _choose(op: str, device: torch.device, dtype: torch.dtype, args: tuple | None, kind: str):
    """(the first backend of ``kind``'s order with no reason against it or None, refusals so far)."""
    order = AUTO_ORDER.get(device.type, ("reference",)) if kind == "auto" else (kind,)
    refused: dict[str, list[str]] = {}
    for name in order:
        for b in _REGISTRY.get(op, []):
            if b.name != name:
                continue
            reasons = b.reasons(device, dtype, args)
            if not reasons:
                return b, refused
            refused[b.name] = reasons
    return None, refused


def faster_than_upstream(op: str, device: torch.device | str, dtype: torch.dtype, args: tuple | None = None) -> bool:
    """Whether the backend that ``op`` would run on now (the requested kind, ``device``, ``dtype``
    and, given its validated ``args``, their input-dependent limits) beats upstream's own code for
    it (:attr:`Backend.faster_than_upstream`). False when no backend can run it. For inference: under
    autograd a forward-only backend hands the call to the reference. Records nothing."""
    device = torch.device(device)
    chosen, _ = _choose(op, device, dtype, args, requested_kind())
    return chosen is not None and chosen.beats_upstream(device, dtype)


def select(op: str, device: torch.device, dtype: torch.dtype, args: tuple | None = None) -> Backend:
    kind = requested_kind()
    candidates = _REGISTRY.get(op, [])
    order = AUTO_ORDER.get(device.type, ("reference",)) if kind == "auto" else (kind,)
    chosen, refused = _choose(op, device, dtype, args, kind)
    if chosen is not None:
        record(op, chosen.name, refused)
        return chosen
    for b in candidates:
        if b.name not in order:
            refused.setdefault(b.name, ["not requested" if kind != "auto" else "not tried on this device"])
    for name in order:
        if not any(b.name == name for b in candidates):
            refused.setdefault(name, ["no such backend for this op"])
    listing = "\n".join(f"  {b}: {', '.join(r)}" for b, r in refused.items())
    raise RuntimeError(
        f"no backend can run {op} on device={device.type}, dtype={dtype} with backend={kind!r}:\n{listing}"
    )


def record(op: str, backend_name: str, refused: dict[str, list[str]]) -> None:
    """Note which backend ran ``op`` (and why the others did not) for :func:`last_backends`.
    Not while torch.compile traces (the custom op records when the compiled code runs it)."""
    if torch.compiler.is_compiling():
        return
    # a new dict each time: a task inherits its creator's record without sharing later updates
    _LAST.set({**(_LAST.get() or {}), op: Choice(op, backend_name, refused)})


def record_run(op: str, backend_name: str) -> None:
    """A custom op ran ``backend_name``: recorded unless this call's dispatch already said so."""
    last = (_LAST.get() or {}).get(op)
    if last is None or last.backend != backend_name:
        record(op, backend_name, {})


def last_backends() -> dict[str, Choice]:
    """The backend chosen for the most recent call of each op in this thread / asyncio task (a copy)."""
    return dict(_LAST.get() or {})


def clear_last_backends() -> None:
    _LAST.set(None)


# ---- requirement checks shared by backends --------------------------------------------------


@functools.lru_cache(None)
def _module_missing(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"python package '{name}' is not installed"


def needs_module(name: str) -> Callable[[], str | None]:
    reason = _module_missing(name)  # decided once, so torch.compile traces a constant
    return lambda: reason


def needs_cuda() -> str | None:
    return None if torch.cuda.is_available() else "torch has no usable CUDA device"


def triton_interpret_mode() -> bool:
    """Whether this process's Triton interprets kernels (TRITON_INTERPRET, read at decoration)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def needs_interpret(wanted: bool) -> Callable[[], str | None]:
    """Triton decides compiled vs interpreted when kernels are decorated: one mode per process."""

    def check() -> str | None:
        if triton_interpret_mode() == wanted:
            return None
        return ("needs TRITON_INTERPRET=1 set before triton is imported" if wanted
                else "TRITON_INTERPRET=1 is set: this process runs kernels in the interpreter")

    return check


@functools.lru_cache(None)
def needs_triton_compiler() -> str | None:
    """Compiled Triton needs the package and a CUDA device it can target."""
    reason = _module_missing("triton") or needs_cuda()
    if reason:
        return reason
    major, _ = torch.cuda.get_device_capability()
    return None if major >= 8 else f"compute capability {major}.x < 8.0 (the kernels need bf16 tensor cores)"


def available(ops: Iterable[str] | None = None) -> dict[str, dict[str, list[str]]]:
    """For each op and backend: [] if usable here for a CPU/CUDA float tensor, else the reasons."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = {}
    for op in ops or sorted(_REGISTRY):
        table[op] = {}
        for b in _REGISTRY.get(op, []):
            dtype = b.dtypes[0] if b.dtypes else torch.float32
            table[op][b.name] = b.reasons(device, dtype)
    return table
