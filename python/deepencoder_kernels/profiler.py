"""Measure DeepEncoder (v1) or DeepEncoder V2 per stage (FLOPs, activation bytes, time) and check the
claims in circulation.

Two kinds of pass, never mixed:
- one counting pass on fake tensors (the encoder's structure in the requested dtype on the target
  device type; nothing computed): FLOPs from ``FlopCounterMode`` (the custom ops carry registered
  formulas) and activation bytes from :class:`MemoryTracker`, a dispatch mode that follows every
  storage the run creates until it dies. Exact, instant, the same on any machine of that device type.
- warm timing passes with no dispatch mode attached: warm-up pass(es) timed on their own line (on a
  GPU that is where Triton compiles and autotunes), then ``repeat`` passes giving per-stage median /
  min / max (CUDA events on a GPU) and views/s. NVTX ranges wrap every stage.
On a CPU that emulates bf16/fp16 matmuls (measured by :func:`matmul_gflops`), the timing passes run
in fp32 and the report says so; FLOPs and bytes stay those of the requested dtype.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
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
    kernel_module.kernel_for = lambda interpret, *kernel: _NoLaunch()   # (some launchers name the kernel)
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


_RETURNS_INPUT = (torch.ops.aten.resolve_neg.default, torch.ops.aten.resolve_conj.default)


class MemoryTracker(TorchDispatchMode):
    """Live / peak / total bytes of the storages created by ops run under it.

    An op output that shares storage with one of its inputs (a view, an in-place op) is not a
    new allocation; a storage is freed when the last tensor created on it here dies. Storages are
    told apart by their StorageImpl (not their data pointer), so meta and fake tensors count too.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.total = 0
        self.largest = 0
        self._refs: dict[int, list[int]] = {}  # storage key -> [nbytes, tensors alive]
        self._alias: dict[int, int] = {}       # storage key -> the key of the storage it aliases
        self._aliases_of: dict[int, list[int]] = {}

    def _key(self, t: torch.Tensor) -> int:
        k = t.untyped_storage()._cdata
        return self._alias.get(k, k)

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]
            for alias in self._aliases_of.pop(ptr, ()):
                self._alias.pop(alias, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors_in = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {self._key(t) for t in tensors_in}
        # resolve_neg / resolve_conj return their input when there is nothing to resolve; a fake
        # tensor's version comes back with a storage object of its own: count it as the input's
        aliasing = func in _RETURNS_INPUT and not (tensors_in[0].is_neg() or tensors_in[0].is_conj())
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = self._key(t), storage.nbytes()
            if aliasing and ptr not in self._refs and ptr not in inputs:
                canonical = self._key(tensors_in[0])
                self._alias[ptr] = canonical
                self._aliases_of.setdefault(canonical, []).append(ptr)
                ptr = canonical
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
    seconds: float = 0.0         # median over the warm passes (0: not timed)
    seconds_min: float = 0.0
    seconds_max: float = 0.0
    peak_bytes: int = 0          # highest live activation bytes while the stage ran (counting pass)
    allocated_bytes: int = 0     # everything the stage allocated (counting pass)
    largest_tensor_bytes: int = 0


@dataclass
class Profile:
    mode: str
    image_size: int
    views: int                   # views of one page
    dtype: str                   # the requested dtype: FLOPs and bytes are counted in it
    device: str
    device_name: str
    backend: str
    weights: str
    output_tokens: int           # tokens of one page
    batch: int = 1               # pages per pass
    stages: list[StageRecord] = field(default_factory=list)
    backends: dict[str, str] = field(default_factory=dict)
    claims: list[dict] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    date: str = ""
    count_seconds: float = 0.0   # wall time of the counting pass (fake tensors, no compute)
    timing_dtype: str = ""       # dtype the warm passes ran in ("" when not timed)
    timing_note: str = ""        # why it differs from ``dtype``, if it does
    matmul_gflops: dict[str, float] = field(default_factory=dict)   # the probe behind that choice
    warmup: int = 0
    repeat: int = 0
    first_pass_seconds: float = 0.0          # warm-up pass(es): compile / autotune / first-touch costs
    pass_seconds: list[float] = field(default_factory=list)          # each warm pass, wall, synchronised
    measured_peak_bytes: int = 0             # CUDA: the caching allocator's peak over the warm passes
    load_average: float = 0.0                # the host's 1-minute load average after the timed passes
    cpus: int = 0                            # logical CPUs of the host (what the load compares with)
    model: str = "v1"                        # encoder generation: v1 (DeepSeek-OCR) or v2 (DeepSeek-OCR 2)
    tile_size: int = 0                       # side of the tiles (0: no tiles in this mode)
    prefix_lm_flops: dict[str, int] = field(default_factory=dict)   # V2 causal-flow attention: dense vs needed

    def stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    @property
    def padding_flops(self) -> int:
        """What upstream adds by running qkv/proj on the zero-padded window tokens (skipped here)."""
        tiles = (self.views - 1) * window_padding_flops(self.tile_size) if self.views > 1 else 0
        return self.batch * (window_padding_flops(self.image_size) + tiles)

    @property
    def sam_trunk_flops(self) -> int:
        return sum(self.stage(n).flops for n in ("patch embed", "windowed blocks", "global blocks"))

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def seconds(self) -> float:
        """Median wall time of one warm pass (0: not timed)."""
        return statistics.median(self.pass_seconds) if self.pass_seconds else 0.0

    @property
    def views_per_second(self) -> float:
        return self.batch * self.views / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["sam_trunk_flops"] = self.sam_trunk_flops
        d["total_flops"] = self.total_flops
        d["peak_bytes"] = self.peak_bytes
        d["seconds"] = self.seconds
        d["views_per_second"] = self.views_per_second
        return d


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


class _Counter:
    """Stage hook of the counting pass: FLOPs and activation bytes per stage (no time)."""

    def __init__(self, flops: FlopCounterMode, tracker: MemoryTracker):
        self.flops, self.memory = flops, CpuMemory(tracker)
        self.records = {name: StageRecord(name) for name in STAGES}

    @contextlib.contextmanager
    def __call__(self, name, tokens_in=0, tokens_out=0):
        rec = self.records[name]
        rec.calls += 1
        rec.tokens_in, rec.tokens_out = tokens_in, tokens_out
        flops0 = self.flops.get_total_flops()
        self.memory.begin()
        yield rec
        rec.flops += self.flops.get_total_flops() - flops0
        peak, allocated, largest = self.memory.end()
        rec.peak_bytes = max(rec.peak_bytes, peak)
        rec.allocated_bytes += allocated
        rec.largest_tensor_bytes = max(rec.largest_tensor_bytes, largest)


class _Timer:
    """Stage hook of the warm passes: an NVTX range and the stage's time, from CUDA events on a GPU
    (read after the pass's one synchronisation) or the host clock on a CPU (where ops are synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name, tokens_in=0, tokens_out=0):
        with nvtx_stage(name, tokens_in, tokens_out):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
            else:
                start = time.perf_counter()
                yield
                end = time.perf_counter()
        self.spans.append((name, start, end))

    def seconds(self) -> dict[str, float]:
        """Seconds per stage name, summed over its calls (call after synchronising)."""
        out: dict[str, float] = {}
        for name, start, end in self.spans:
            out[name] = out.get(name, 0.0) + (start.elapsed_time(end) / 1e3 if self.cuda else end - start)
        return out


def _progress_printer(enabled: bool):
    """One updating line on a terminal; elsewhere (logs, CI) a line per step."""
    start, tty = time.perf_counter(), sys.stderr.isatty()

    def show(text):
        if not enabled:
            return
        text = f"[profile {time.perf_counter() - start:6.1f}s] {text}"
        print(f"\r{text:<60}" if tty else text, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


_SMALL_INIT = ("rel_pos", "pos_embed", "class_embedding", "position_embedding", "newline", "seperator", "query_")


def skeleton_encoder(model: str = "v1"):
    """Full-size DeepEncoder (``model`` "v1") or DeepEncoderV2 ("v2") with its parameters on the meta
    device (no memory, no init) and its buffers real (``position_ids``): the structure the counting
    pass runs, and what :func:`random_encoder` fills."""
    from .modules import DeepEncoder, DeepEncoderV2

    if model not in cfg.MODELS:
        raise ValueError(f"model must be one of {sorted(cfg.MODELS)}, got {model!r}")

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta     # init then runs on meta tensors: a no-op
    try:
        return DeepEncoderV2() if model == "v2" else DeepEncoder()
    finally:
        torch.nn.Module.register_parameter = register


def random_encoder(seed: int = 0, dtype=torch.float32, device="cpu", model=None):
    """Full-size DeepEncoder with seeded random weights: Linear/conv weights uniform in
    +-1/sqrt(fan_in) (torch's default bound), LayerNorms / RMSNorms 1 / 0, positions, tables, query
    banks and other vectors N(0, 0.02), so nothing is zero. Parameters are allocated once in ``dtype``
    and filled in place (no fp32 copy, no second init). ``model``: a :func:`skeleton_encoder` to fill
    instead, or "v1" / "v2" for that generation's."""
    from .modules.causal_flow import RMSNorm
    from .modules.sam import LayerNorm2d

    enc = model if isinstance(model, torch.nn.Module) else skeleton_encoder(model or "v1")
    for module in enc.modules():
        for name, p in module._parameters.items():
            if p is not None and p.device.type == "meta":
                empty = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(empty, requires_grad=p.requires_grad)
    enc = enc.to(device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    norms = {id(p) for m in enc.modules() if isinstance(m, (torch.nn.LayerNorm, LayerNorm2d, RMSNorm)) for p in m.parameters()}
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if id(p) in norms:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() >= 2 and not any(s in name for s in _SMALL_INIT):
                bound = 1 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return enc.eval()


def fake_copy(model: torch.nn.Module, fake_mode: FakeTensorMode, dtype: torch.dtype, device) -> torch.nn.Module:
    """``model``'s structure with every parameter and buffer a fake tensor (floating ones in
    ``dtype``) on ``device``: no memory, no copy of the weights."""
    memo = {}
    with fake_mode:
        for t in [*model.parameters(), *model.buffers()]:
            fake = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            memo[id(t)] = torch.nn.Parameter(fake, requires_grad=False) if isinstance(t, torch.nn.Parameter) else fake
    return copy.deepcopy(model, memo)


def encode_copies(encoder, views, batch: int = 1, stage=nvtx_stage) -> list[torch.Tensor]:
    """``batch`` copies of one page through the encoder as one batch ([batch, 3, S, S] per view
    size, as a server batches same-mode pages); each copy's tokens in upstream's layout. Each view
    size is its own pass (V2: the global views, then the tiles, each one causal-flow call of equal
    lengths), as upstream batches them, so every stage counts the work upstream does per view."""
    if getattr(encoder, "generation", "v1") == "v2":
        device, dtype = encoder._placement
        pixels = views.global_view[None].expand(batch, -1, -1, -1).to(device, dtype)
        global_feats = encoder.view_features([pixels], stage)[0]
        tile_feats = None
        if views.tiles is not None:
            n = views.tiles.shape[0]
            tiles = views.tiles[None].expand(batch, -1, -1, -1, -1).reshape(batch * n, *views.tiles.shape[1:])
            tile_feats = encoder.view_features([tiles.to(device, dtype)], stage)[0].view(batch, n, -1, global_feats.shape[-1])
        return [encoder.layout(global_feats[i], None if tile_feats is None else tile_feats[i]) for i in range(batch)]
    if batch == 1:
        return [encoder.encode_views(views, stage)]
    if encoder.saccades is not None:
        raise ValueError("batch > 1 profiles an encoder without saccades (use batch=1 with saccades)")
    weight = encoder.projector.layers.weight
    pixels = views.global_view[None].expand(batch, -1, -1, -1).to(weight.device, weight.dtype)
    global_feats = encoder.view_features(pixels, stage)
    tile_feats = None
    if views.tiles is not None:
        n = views.tiles.shape[0]
        tiles = views.tiles[None].expand(batch, -1, -1, -1, -1).reshape(batch * n, *views.tiles.shape[1:])
        tile_feats = encoder.view_features(tiles.to(weight.device, weight.dtype), stage).view(batch, n, -1, global_feats.shape[-1])
    return [encoder.layout(global_feats[i], None if tile_feats is None else tile_feats[i], views.grid) for i in range(batch)]


@functools.lru_cache(maxsize=None)
def matmul_gflops(dtype: torch.dtype, n: int = 256, k: int = 768, m: int = 768, min_seconds: float = 0.05) -> float:
    """GFLOP/s of an [n, k] x [k, m] CPU matmul in ``dtype``, per second of process CPU time (so a
    busy shared machine slows every dtype alike): matmuls repeated until ``min_seconds`` of CPU time
    (one at least) after a warm-up, best of two rounds."""
    a, b = torch.randn(n, k).to(dtype), torch.randn(k, m).to(dtype)
    a @ b
    best = 0.0
    for _ in range(2):
        t0, reps = time.process_time(), 0
        while True:
            a @ b
            reps += 1
            spent = time.process_time() - t0
            if spent >= min_seconds or reps >= 1000:
                break
        best = max(best, 2 * n * k * m * reps / max(spent, 1e-9) / 1e9)
    return best


SLOW_MATMUL = 0.1    # a dtype whose CPU matmul runs below this fraction of fp32's is emulated, not native
                     # (measured: ~0.01 on an AVX2 EPYC without bf16 units, >= 1 with AMX)


def choose_timing_dtype(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, str, dict]:
    """The dtype to time the forward in: the requested one, except on a CPU whose matmul in it is
    far slower than fp32 (bf16/fp16 without native matrix units: measured, not guessed from the
    CPU's name), where fp32 gives the stage breakdown in seconds instead of minutes."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype, "", {}
    name = str(dtype).replace("torch.", "")
    rates = {name: matmul_gflops(dtype), "float32": matmul_gflops(torch.float32)}
    if rates[name] >= SLOW_MATMUL * rates["float32"]:
        return dtype, "", rates
    note = (f"timed in float32: this CPU's {name} matmul runs at {rates[name]:.1f} GFLOP/s vs {rates['float32']:.1f} "
            f"in float32 (no native {name} matrix units), so {name} times would measure the emulation; "
            f"FLOPs and bytes are counted in {name}")
    return torch.float32, note, rates


def clip_flops_at(tokens_side: int) -> int:
    """CLIP-large FLOPs over a ``side x side`` grid + CLS, counted on the meta device (no compute)."""
    from .modules import ClipVisionModel

    with torch.device("meta"):
        clip = ClipVisionModel()
        x = torch.empty(1, tokens_side * tokens_side, cfg.CLIP_DIM)
    with FlopCounterMode(display=False) as counter:
        clip.from_tokens(x)
    return counter.get_total_flops()


def causal_flow_attention_flops(view_sides: list[int]) -> dict[str, int]:
    """FLOPs of V2's causal-flow attention (QK^T + PV, 24 layers) over views of these sides: ``dense``
    as upstream's SDPA with a dense float mask computes it (every (2n)^2 score, as the op's formula
    counts it) and ``needed`` by the prefix-LM mask (image rows n keys, query row i n + i + 1 keys:
    62.5% of dense at n = 256). Counted from shapes."""
    per_score = 4 * cfg.CAUSAL_FLOW_HEADS * cfg.HEAD_DIM * cfg.CAUSAL_FLOW_DEPTH
    dense = needed = 0
    for side in view_sides:
        n = cfg.v2_view_tokens(side)
        dense += per_score * (2 * n) ** 2
        needed += per_score * (2 * n * n + n * (n + 1) // 2)
    return {"dense": dense, "needed": needed}


V2_SPEC_GFLOPS = {1024: 1366.2, 768: 728.0}   # deepencoder-v2.md: FlopCounterMode over upstream's modules, fp32, batch 1


def _claims_v2(p: Profile) -> list[dict]:
    """DeepSeek-OCR 2's README and paper, and the reference's measured FLOPs per view."""
    out = []
    if p.batch == 1:
        tiles = p.views - 1
        page_tokens = p.output_tokens - 1        # the separator is not a visual token
        out.append({"claim": "README: (0-6)x768x768 + 1x1024x1024 views per page", "claimed": 7, "measured": p.views,
                    "ratio": p.views / 7, "verdict": "within" if 1 <= p.views <= 7 and tiles != 1 else "outside"})
        out.append({"claim": "paper: 256 to 1120 visual tokens per page", "claimed": 1120, "measured": page_tokens,
                    "ratio": page_tokens / 1120, "verdict": f"within (256 + 144 x {tiles})" if 256 <= page_tokens <= 1120 else "outside"})
        upstream = (p.total_flops + p.padding_flops) / 1e9
        spec = V2_SPEC_GFLOPS[1024] + tiles * V2_SPEC_GFLOPS[768]
        out.append({"claim": f"upstream counted {spec:.1f} GFLOPs per page (1366.2 + 728.0 per tile)", "claimed": spec,
                    "measured": upstream, "ratio": upstream / spec,
                    "verdict": "equal" if abs(upstream - spec) < 0.05 * (1 + tiles) else f"differs by {upstream - spec:+.1f}"})
    return out


def _claims(p: Profile) -> list[dict]:
    G = 1e9
    if p.model == "v2":
        return _claims_v2(p)

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
    if p.mode == "base" and p.views == 1 and p.batch == 1:
        out.append(verdict(p.sam_trunk_flops / G, 65.0, "SAM ~65 GFLOPs"))
        out.append(verdict(p.stage("CLIP").flops / G, 180.0, "CLIP ~180 GFLOPs"))
        out.append(verdict(p.total_flops / G, 245.0, "total ~245 GFLOPs"))
        peak = verdict(p.peak_bytes / 2**30, 1.5, "~1.5 GB activations (bf16, batch 1)")
        if p.dtype != "bfloat16":
            peak["verdict"] += f" (counted in {p.dtype}; rerun with --dtype bfloat16 to compare)"
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


def count(views, encoder, dtype: torch.dtype, device: torch.device, batch: int = 1):
    """The counting pass: the encoder's structure on fake tensors in ``dtype`` on ``device``'s type
    (the same kernels are chosen as in a real run there, e.g. CPU flash attention; nothing is
    computed), under ``FlopCounterMode`` and :class:`MemoryTracker`. Exact and independent of the
    machine's speed. ``device`` "meta" runs on meta tensors instead. Returns (stage records, tokens)."""
    flops, tracker = FlopCounterMode(display=False), MemoryTracker()
    counter = _Counter(flops, tracker)
    if device.type == "meta":
        fake, model = contextlib.nullcontext(), encoder.to(dtype)
    else:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        model = fake_copy(encoder, fake, dtype, device)
        # the page's pixels as fake tensors before counting starts, as real ones exist before a real run
        views = dataclasses.replace(views, global_view=fake.from_tensor(views.global_view),
                                    tiles=None if views.tiles is None else fake.from_tensor(views.tiles))
    with fake, torch.inference_mode(), flops, tracker:
        out = encode_copies(model, views, batch, stage=counter)
    return [r for r in counter.records.values() if r.calls], out[0].shape[0]


def profile(mode: str | None = None, image=None, weights: str | None = None, dtype: torch.dtype = torch.bfloat16,
            device: str | None = None, progress: bool = True, encoder=None, repeat: int = 1, warmup: int = 1,
            batch: int = 1, timing_dtype: torch.dtype | None = None, max_crops: int | None = None,
            model: str | None = None) -> Profile:
    """Profile the encoder on ``image`` (default: a rendered document page), ``batch`` copies per pass.

    ``model``: "v1" (DeepSeek-OCR's DeepEncoder, default mode ``base``) or "v2" (DeepEncoder V2, default
    mode ``dynamic``); default: the given encoder's generation, else v1. ``max_crops``: the tile
    budget (None: the mode's).

    1. Counting pass (:func:`count`): FLOPs and activation bytes per stage in ``dtype``; instant.
    2. ``warmup`` passes, timed apart (on a GPU: Triton compilation / autotuning happen here).
    3. ``repeat`` warm passes: per-stage seconds (median, min, max) and views/s.
    ``repeat=0`` (or ``device="meta"``) counts only. ``timing_dtype`` defaults to ``dtype`` except on a
    CPU that emulates it (:func:`choose_timing_dtype`); a given ``encoder`` is timed in its own dtype.
    """
    model = model or getattr(encoder, "generation", "v1")
    if encoder is not None and getattr(encoder, "generation", "v1") != model:
        raise ValueError(f"model={model!r} but the given encoder is {type(encoder).__name__} ({encoder.generation})")
    mode = mode or ("dynamic" if model == "v2" else "base")
    m = cfg.mode_of(mode, model)
    for name, value, low in (("repeat", repeat, 0), ("warmup", warmup, 0), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    show = _progress_printer(progress)
    views = preprocess(image if image is not None else render_document_page(), mode, max_crops, model)
    n_views = 1 + (views.tiles.shape[0] if views.tiles is not None else 0)

    show("counting FLOPs and bytes (fake tensors)")
    t0 = time.perf_counter()
    structure = encoder if encoder is not None else skeleton_encoder(model)
    dispatch.clear_last_backends()
    stages, tokens = count(views, structure, dtype, dev, batch)
    count_seconds = time.perf_counter() - t0
    backends = {op: c.backend for op, c in dispatch.last_backends().items()}
    p = Profile(
        mode=mode, image_size=m.base_size, views=n_views, dtype=str(dtype).replace("torch.", ""),
        device=dev.type, device_name=device_name(dev), backend=dispatch.requested_kind(),
        weights=weights or ("given encoder" if encoder is not None else "seeded random (seed 0)"),
        output_tokens=tokens, batch=batch, stages=stages, backends=backends, versions=_versions(),
        date=time.strftime("%Y-%m-%d"), count_seconds=count_seconds, model=model,
        tile_size=m.tile_size if n_views > 1 else 0,
    )
    if model == "v2":
        p.prefix_lm_flops = {k: batch * v for k, v in
                             causal_flow_attention_flops([m.base_size] + [m.tile_size] * (n_views - 1)).items()}
    if getattr(structure, "saccades", None) is None:
        assert tokens == token_count(mode, views.grid, model)
    p.claims = _claims(p)
    if dev.type == "meta" or repeat == 0:
        return p

    given = encoder is not None
    own_dtype = encoder.projector.layers.weight.dtype if given else dtype
    tdtype, p.timing_note, p.matmul_gflops = (timing_dtype, "", {}) if timing_dtype else choose_timing_dtype(own_dtype, dev)
    if not given:
        show(f"building the encoder ({str(tdtype).replace('torch.', '')})")
        encoder = random_encoder(dtype=tdtype, device=dev, model=structure)
        if weights:
            encoder.load_checkpoint(weights)
    elif tdtype != own_dtype:
        encoder = copy.deepcopy(encoder).to(tdtype)     # the caller's encoder stays as it is
    p.timing_dtype = str(tdtype).replace("torch.", "")
    if tdtype != dtype and not p.timing_note:
        p.timing_note = f"timed in {p.timing_dtype}; FLOPs and bytes are counted in {p.dtype}"

    def one_pass(timer) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        with torch.inference_mode():
            encode_copies(encoder, views, batch, stage=timer)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    dispatch.clear_last_backends()
    p.warmup, p.repeat = warmup, repeat
    for i in range(warmup):
        show(f"warm-up pass {i + 1}/{warmup}")
        p.first_pass_seconds += one_pass(nvtx_stage)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    per_stage: dict[str, list[float]] = {}
    for i in range(repeat):
        show(f"timed pass {i + 1}/{repeat}")
        timer = _Timer(dev)
        p.pass_seconds.append(one_pass(timer))
        for name, sec in timer.seconds().items():
            per_stage.setdefault(name, []).append(sec)
    if dev.type == "cuda":
        p.measured_peak_bytes = torch.cuda.max_memory_allocated(dev) - base
    if hasattr(os, "getloadavg"):    # wall times on a shared host grow with its load: say what it was
        p.load_average, p.cpus = os.getloadavg()[0], os.cpu_count() or 0
    for s in p.stages:
        times = per_stage.get(s.name, [0.0])
        s.seconds, s.seconds_min, s.seconds_max = statistics.median(times), min(times), max(times)
    p.backends = {op: c.backend for op, c in dispatch.last_backends().items()} or p.backends
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
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
    timed = bool(p.pass_seconds)
    per_page = f", batch {p.batch} pages per pass" if p.batch > 1 else ""
    name = "DeepEncoder V2 (DeepSeek-OCR 2)" if p.model == "v2" else "DeepEncoder (DeepSeek-OCR)"
    lines = [
        f"{name} profile: mode={p.mode} ({p.image_size}px, {p.views} view(s) per page{per_page}), dtype={p.dtype}, "
        f"device={p.device_name}, backend={p.backend}, weights={p.weights}",
        f"output: {p.output_tokens} tokens x {cfg.PROJ_OUT} per page; ops ran on: "
        + ", ".join(f"{op}={b}" for op, b in sorted(p.backends.items())),
        f"FLOPs and activation bytes: counted in {p.dtype} on fake tensors ({p.count_seconds:.1f}s; exact, no compute, "
        f"the same on any {p.device} machine)" + (f", for {p.batch} pages" if p.batch > 1 else ""),
    ]
    if timed:
        med = p.seconds
        lines.append(
            f"times: {p.timing_dtype}, median (min..max) of {p.repeat} warm pass(es) after {p.warmup} warm-up; "
            + ("CUDA events per stage" if p.device == "cuda" else "host clock per stage (CPU ops are synchronous)"))
        if p.timing_note:
            lines.append(f"  note: {p.timing_note}")
        if p.cpus:
            lines.append(f"  host load: 1-minute load average {p.load_average:.1f} on {p.cpus} CPUs after the timed passes "
                         "(wall times grow with other processes' load; FLOPs and bytes do not)")
        if p.warmup:
            one_time = p.first_pass_seconds / p.warmup - med
            lines.append(f"warm-up: {p.first_pass_seconds:.2f}s for {p.warmup} pass(es), {one_time:+.2f}s per pass over the warm median "
                         "(one-time costs: Triton JIT compile + autotune on a GPU, first touches on a CPU; and noise); not in the times below")
    else:
        lines.append("times: not measured (counting only)")
    head = (f"{'stage':<17}{'calls':>6}{'tokens in':>11}{'tokens out':>11}{'GFLOPs':>10}{'peak MiB':>10}"
            f"{'alloc MiB':>11}{'largest MiB':>12}")
    lines += ["", head + (f"{'time s':>9}{'min..max s':>15}" if timed else "")]
    for s in p.stages:
        row = (f"{s.name:<17}{s.calls:>6}{s.tokens_in:>11}{s.tokens_out:>11}{s.flops / G:>10.1f}"
               f"{s.peak_bytes / MiB:>10.1f}{s.allocated_bytes / MiB:>11.1f}{s.largest_tensor_bytes / MiB:>12.1f}")
        if timed:
            row += f"{s.seconds:>9.3f}{f'{s.seconds_min:.3f}..{s.seconds_max:.3f}':>15}"
        lines.append(row)
    lines.append(f"{'SAM trunk':<17}{'':>6}{'':>11}{'':>11}{p.sam_trunk_flops / G:>10.1f}")
    total = (f"{'total':<17}{'':>6}{'':>11}{'':>11}{p.total_flops / G:>10.1f}{p.peak_bytes / MiB:>10.1f}"
             f"{sum(s.allocated_bytes for s in p.stages) / MiB:>11.1f}{'':>12}")
    if timed:
        total += f"{p.seconds:>9.3f}{f'{min(p.pass_seconds):.3f}..{max(p.pass_seconds):.3f}':>15}"
    lines.append(total)
    if timed:
        lines.append(f"throughput: {p.views_per_second:.2f} views/s ({p.batch * p.views} views per pass, "
                     f"{p.batch / p.seconds:.2f} pages/s, {p.total_flops / p.seconds / G:.1f} GFLOP/s)")
        if p.measured_peak_bytes:
            lines.append(f"CUDA caching allocator peak over the warm passes: {p.measured_peak_bytes / MiB:.1f} MiB above the weights")
    pad = p.padding_flops
    if p.prefix_lm_flops:
        dense, needed = p.prefix_lm_flops["dense"], p.prefix_lm_flops["needed"]
        lines.append(f"causal flow attention (prefix-LM): {dense / G:.2f} GFLOPs as a dense mask computes it (counted above), "
                     f"{needed / G:.2f} needed ({needed / dense:.1%}); the fused kernel skips the key tiles a row cannot see")
    lines.append(
        f"(upstream also runs qkv/proj on the zero-padded window tokens: +{pad / G:.1f} GFLOPs, counted from "
        f"shapes: SAM trunk {(p.sam_trunk_flops + pad) / G:.1f}, total {(p.total_flops + pad) / G:.1f} as upstream "
        f"runs it. Here those tokens' qkv is exactly the bias, so that work is skipped.)"
    )
    if p.claims:
        width = max(40, *(len(c["claim"]) + 2 for c in p.claims))
        lines += ["", f"{'claim in circulation':<{width}}{'claimed':>10}{'measured':>11}  verdict"]
        for c in p.claims:
            lines.append(f"{c['claim']:<{width}}{c['claimed']:>10.4g}{c['measured']:>11.4g}  {c['verdict']}")
    return "\n".join(lines)


def plot(p: Profile, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in p.stages]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series = [
        ([s.flops / 1e9 for s in p.stages], f"GFLOPs ({p.dtype})"),
        ([s.peak_bytes / MiB for s in p.stages], f"peak activation MiB ({p.dtype})"),
        ([s.seconds for s in p.stages], f"warm time s, median ({p.device}, {p.timing_dtype or 'not timed'})"),
    ]
    for ax, (values, label) in zip(axes, series):
        ax.barh(names, values, color="#4c72b0")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    fig.suptitle(f"DeepEncoder{' V2' if p.model == 'v2' else ''} {p.mode} ({p.image_size}px), {p.dtype}, {p.device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(p: Profile, path: str) -> None:
    with open(path, "w") as f:
        json.dump(p.to_json(), f, indent=2, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)
