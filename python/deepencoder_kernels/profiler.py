"""Measure DeepEncoder per stage (FLOPs, activation bytes, time) and check the claims in circulation.

FLOPs are counted while the encoder runs (``FlopCounterMode``; the custom ops carry registered
formulas). Activation memory on CPU is tracked by :class:`MemoryTracker`, a dispatch mode that
follows every storage the run allocates until it is freed; on CUDA the caching allocator's own
peak is used instead (it also sees what fused kernels allocate inside their ops).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from . import config as cfg
from . import dispatch
from .preprocess import preprocess, render_document_page, token_count
from .stages import STAGES, nvtx_stage

MiB = 2**20


# torch counts SDPA's CUDA kernels but has no formula for the CPU flash kernel, so attention
# would vanish from CPU profiles. Count it with torch's own SDPA rule (QK^T + PV).
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextlib.contextmanager
def stubbed_launches(kernel_module):
    """Run a fused op's launcher with its Triton launch replaced by a no-op, to measure the memory the
    launcher allocates at sizes where the interpreter would take hours. A Triton kernel allocates no
    memory of its own, so this is the fused path's allocation (tests check it equals a real
    interpreted run); it says nothing about numerics or speed."""
    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    original = kernel_module.kernel_for
    kernel_module.kernel_for = lambda interpret: _NoLaunch()
    try:
        yield
    finally:
        kernel_module.kernel_for = original


class TrafficCounter(TorchDispatchMode):
    """Memory passes and bytes of the ops run under it, counting each op as one pass that reads its
    tensor inputs and writes its outputs once (a lower bound for eager code: caches and re-reads
    inside an op are not counted). Views and allocations move no data and are not counted."""

    def __init__(self):
        super().__init__()
        self.passes = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.__name__.startswith(("empty", "zeros", "ones", "full")):
            return out
        if not func._schema.is_mutable:  # an op returning its input's storage (``_unsafe_view``) moves nothing
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if outs and all(t.untyped_storage().data_ptr() in inputs for t in outs):
                return out
        size = lambda ts: sum(t.numel() * t.element_size() for t in tree_leaves(ts) if isinstance(t, torch.Tensor))  # noqa: E731
        read, written = size((args, kwargs)), size(out)
        if read or written:
            self.passes += 1
            self.bytes_read += read
            self.bytes_written += written
        return out


class MemoryTracker(TorchDispatchMode):
    """Live / peak / total bytes of the storages created by ops run under it.

    An op output that shares storage with one of its inputs (a view, an in-place op) is not a
    new allocation; a storage is freed when the last tensor created on it here dies.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.total = 0
        self.largest = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [nbytes, tensors alive]

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in self._refs:
                self._refs[ptr][1] += 1
            elif ptr in inputs or nbytes == 0:
                continue
            else:
                self._refs[ptr] = [nbytes, 1]
                self.live += nbytes
                self.total += nbytes
                self.largest = max(self.largest, nbytes)
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr)
        return out


@dataclass
class StageRecord:
    name: str
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    flops: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0          # highest live activation bytes while the stage ran
    allocated_bytes: int = 0     # everything the stage allocated
    largest_tensor_bytes: int = 0


@dataclass
class Profile:
    mode: str
    image_size: int
    views: int
    dtype: str
    device: str
    device_name: str
    backend: str
    weights: str
    output_tokens: int
    stages: list[StageRecord] = field(default_factory=list)
    backends: dict[str, str] = field(default_factory=dict)
    claims: list[dict] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    date: str = ""

    def stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    @property
    def sam_trunk_flops(self) -> int:
        return sum(self.stage(n).flops for n in ("patch embed", "windowed blocks", "global blocks"))

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    def to_json(self) -> dict:
        d = asdict(self)
        d["sam_trunk_flops"] = self.sam_trunk_flops
        d["total_flops"] = self.total_flops
        d["peak_bytes"] = self.peak_bytes
        return d


class CudaMemory:
    """The caching allocator's figures, relative to what was allocated before the run (weights)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = torch.cuda.memory_allocated(device)

    def begin(self):
        torch.cuda.reset_peak_memory_stats(self.device)
        self._total0 = torch.cuda.memory_stats(self.device).get("allocated_bytes.all.allocated", 0)

    def end(self):
        peak = torch.cuda.max_memory_allocated(self.device) - self.base
        total = torch.cuda.memory_stats(self.device).get("allocated_bytes.all.allocated", 0) - self._total0
        return peak, total, 0  # the allocator does not report single-tensor sizes


class CpuMemory:
    """:class:`MemoryTracker`'s figures for one stage."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker

    def begin(self):
        t = self.tracker
        self._total0, t.peak, t.largest = t.total, t.live, 0

    def end(self):
        t = self.tracker
        return t.peak, t.total - self._total0, t.largest


class _Recorder:
    """The stage hook: NVTX range + FLOP, byte and time accounting per stage."""

    def __init__(self, flops: FlopCounterMode, memory, device: torch.device, progress):
        self.flops, self.memory, self.device, self.progress = flops, memory, device, progress
        self.records = {name: StageRecord(name) for name in STAGES}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name, tokens_in=0, tokens_out=0):
        rec = self.records[name]
        rec.calls += 1
        rec.tokens_in, rec.tokens_out = tokens_in, tokens_out
        self.progress(name, rec.calls)
        flops0 = self.flops.get_total_flops()
        self.memory.begin()
        self._sync()
        t0 = time.perf_counter()
        with nvtx_stage(name):
            yield rec
        self._sync()
        rec.seconds += time.perf_counter() - t0
        rec.flops += self.flops.get_total_flops() - flops0
        peak, allocated, largest = self.memory.end()
        rec.peak_bytes = max(rec.peak_bytes, peak)
        rec.allocated_bytes += allocated
        rec.largest_tensor_bytes = max(rec.largest_tensor_bytes, largest)


def _progress_printer(enabled: bool):
    """One updating line on a terminal; elsewhere (logs, CI) a line per new stage."""
    start, tty = time.perf_counter(), sys.stderr.isatty()

    def show(name, call):
        if not enabled or (not tty and call > 1):
            return
        text = f"[profile {time.perf_counter() - start:6.1f}s] {name} #{call}"
        print(f"\r{text:<60}" if tty else text, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


def random_encoder(seed: int = 0, dtype=torch.float32, device="cpu"):
    """Full-size DeepEncoder with seeded random weights (positions/tables too, so nothing is zero)."""
    from .modules import DeepEncoder

    torch.manual_seed(seed)
    enc = DeepEncoder()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if any(s in name for s in ("rel_pos", "pos_embed", "class_embedding", "position_embedding", "newline", "seperator")):
                p.normal_(0.0, 0.02)
    return enc.to(device=device, dtype=dtype).eval()


def clip_flops_at(tokens_side: int) -> int:
    """CLIP-large FLOPs over a ``side x side`` grid + CLS, counted on the meta device (no compute)."""
    from .modules import ClipVisionModel

    with torch.device("meta"):
        clip = ClipVisionModel()
        x = torch.empty(1, tokens_side * tokens_side, cfg.CLIP_DIM)
    with FlopCounterMode(display=False) as counter:
        clip.from_tokens(x)
    return counter.get_total_flops()


def _claims(p: Profile) -> list[dict]:
    G = 1e9

    def verdict(measured: float, claimed: float, what: str) -> dict:
        ratio = measured / claimed
        if measured == 0:
            word = f"not measured on the {p.device} device"
        elif 0.8 <= ratio <= 1.25:
            word = "about right"
        else:
            word = f"wrong by {ratio:.1f}x" if ratio > 1 else f"wrong by {1 / ratio:.1f}x (too high)"
        return {"claim": what, "claimed": claimed, "measured": measured, "ratio": ratio, "verdict": word}

    out = []
    if p.mode == "base" and p.views == 1:
        out.append(verdict(p.sam_trunk_flops / G, 65.0, "SAM ~65 GFLOPs"))
        out.append(verdict(p.stage("CLIP").flops / G, 180.0, "CLIP ~180 GFLOPs"))
        out.append(verdict(p.total_flops / G, 245.0, "total ~245 GFLOPs"))
        peak = verdict(p.peak_bytes / 2**30, 1.5, "~1.5 GB activations (bf16, batch 1)")
        if p.dtype != "bfloat16":
            peak["verdict"] += f" (measured in {p.dtype}; rerun with --dtype bfloat16 to compare)"
        out.append(peak)
        out.append(verdict(clip_flops_at(cfg.sam_grid(1024)) / G, 2800.0, "CLIP on 4096 tokens ~2800 GFLOPs"))
    win = cfg.SAM_WINDOW
    out.append({"claim": "SAM uses 8x8 windows", "claimed": 8, "measured": win, "ratio": win / 8,
                "verdict": "wrong: windows are 14x14" if win != 8 else "right"})
    return out


def _versions() -> dict[str, str]:
    v = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    from . import __version__

    v["deepencoder_kernels"] = __version__
    return v


def profile(mode: str = "base", image=None, weights: str | None = None, dtype: torch.dtype = torch.bfloat16,
            device: str | None = None, progress: bool = True, encoder=None) -> Profile:
    """Run the encoder once on ``image`` (default: a rendered document page) and measure it."""
    if mode not in cfg.MODES:
        raise ValueError(f"mode must be one of {sorted(cfg.MODES)}, got {mode!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if encoder is None:
        encoder = random_encoder(dtype=dtype, device=dev)
        if weights:
            encoder.load_checkpoint(weights)
    views = preprocess(image if image is not None else render_document_page(), mode)
    flops = FlopCounterMode(display=False)
    tracker = MemoryTracker() if dev.type != "cuda" else None
    meter = CpuMemory(tracker) if tracker is not None else CudaMemory(dev)
    rec = _Recorder(flops, meter, dev, _progress_printer(progress))
    dispatch.clear_last_backends()
    with torch.inference_mode(), flops, (tracker or contextlib.nullcontext()):
        out = encoder.encode_views(views, stage=rec)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    n_views = 1 + (views.tiles.shape[0] if views.tiles is not None else 0)
    p = Profile(
        mode=mode, image_size=cfg.MODES[mode].base_size, views=n_views, dtype=str(dtype).replace("torch.", ""),
        device=dev.type, device_name=device_name(dev),
        backend=dispatch.requested_kind(), weights=weights or "seeded random (seed 0)",
        output_tokens=out.shape[0], stages=[r for r in rec.records.values() if r.calls],
        backends={op: c.backend for op, c in dispatch.last_backends().items()},
        versions=_versions(), date=time.strftime("%Y-%m-%d"),
    )
    assert out.shape[0] == token_count(mode, views.grid)
    p.claims = _claims(p)
    return p


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with torch's thread count (what results are labelled with)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return device.type


def window_padding_flops(image_size: int) -> int:
    """Extra FLOPs upstream spends running qkv/proj on zero-padded window tokens (this package
    skips them: their qkv is exactly the bias). Counted from shapes, not measured."""
    g = cfg.sam_grid(image_size)
    gp = (g + cfg.SAM_WINDOW - 1) // cfg.SAM_WINDOW * cfg.SAM_WINDOW
    windowed = cfg.SAM_DEPTH - len(cfg.SAM_GLOBAL_BLOCKS)
    per_token = 2 * (cfg.SAM_DIM * 3 * cfg.SAM_DIM + cfg.SAM_DIM * cfg.SAM_DIM)
    return windowed * (gp * gp - g * g) * per_token


def format_report(p: Profile) -> str:
    G = 1e9
    lines = [
        f"DeepEncoder profile: mode={p.mode} ({p.image_size}px, {p.views} view(s)), dtype={p.dtype}, "
        f"device={p.device_name}, backend={p.backend}, weights={p.weights}",
        f"output: {p.output_tokens} tokens x {cfg.PROJ_OUT}; ops ran on: "
        + ", ".join(f"{op}={b}" for op, b in sorted(p.backends.items())),
        "",
        f"{'stage':<17}{'calls':>6}{'tokens in':>11}{'tokens out':>11}{'GFLOPs':>10}{'peak MiB':>10}"
        f"{'alloc MiB':>11}{'largest MiB':>12}{'time s':>9}",
    ]
    for s in p.stages:
        lines.append(
            f"{s.name:<17}{s.calls:>6}{s.tokens_in:>11}{s.tokens_out:>11}{s.flops / G:>10.1f}"
            f"{s.peak_bytes / MiB:>10.1f}{s.allocated_bytes / MiB:>11.1f}{s.largest_tensor_bytes / MiB:>12.1f}{s.seconds:>9.2f}"
        )
    lines.append(
        f"{'SAM trunk':<17}{'':>6}{'':>11}{'':>11}{p.sam_trunk_flops / G:>10.1f}"
    )
    lines.append(
        f"{'total':<17}{'':>6}{'':>11}{'':>11}{p.total_flops / G:>10.1f}{p.peak_bytes / MiB:>10.1f}"
        f"{sum(s.allocated_bytes for s in p.stages) / MiB:>11.1f}{'':>12}{sum(s.seconds for s in p.stages):>9.2f}"
    )
    tile = cfg.MODES[p.mode].tile_size
    pad = window_padding_flops(p.image_size) + (p.views - 1) * window_padding_flops(tile)
    lines.append(
        f"(upstream also runs qkv/proj on the zero-padded window tokens: +{pad / G:.1f} GFLOPs, counted from "
        f"shapes: SAM trunk {(p.sam_trunk_flops + pad) / G:.1f}, total {(p.total_flops + pad) / G:.1f} as upstream "
        f"runs it. Here those tokens' qkv is exactly the bias, so that work is skipped.)"
    )
    if p.claims:
        lines += ["", f"{'claim in circulation':<40}{'claimed':>10}{'measured':>11}  verdict"]
        for c in p.claims:
            lines.append(f"{c['claim']:<40}{c['claimed']:>10.4g}{c['measured']:>11.4g}  {c['verdict']}")
    return "\n".join(lines)


def plot(p: Profile, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in p.stages]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series = [
        ([s.flops / 1e9 for s in p.stages], "GFLOPs"),
        ([s.peak_bytes / MiB for s in p.stages], "peak activation MiB"),
        ([s.seconds for s in p.stages], f"time s ({p.device})"),
    ]
    for ax, (values, label) in zip(axes, series):
        ax.barh(names, values, color="#4c72b0")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    fig.suptitle(f"DeepEncoder {p.mode} ({p.image_size}px), {p.dtype}, {p.device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(p: Profile, path: str) -> None:
    with open(path, "w") as f:
        json.dump(p.to_json(), f, indent=2, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)
