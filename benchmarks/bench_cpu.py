"""CPU: this package vs upstream's code, same weights, side by side in one process.

Three ways to encode a view, sharing one set of parameter tensors (seeded random weights):
  - ``upstream``: DeepSeek's module structure: SAM from tests/upstream.py at full size (windowed
    blocks pad before their qkv Linear, two einsums, the dense bias) and an upstream-structured
    CLIP-L here (fused qkv_proj, permuted q/k/v into SDPA, quick_gelu), cat + projector;
  - ``package``: ``dk.DeepEncoder.encode_pixels`` (``auto`` backends: ``sdpa-blocked`` on a CPU);
  - ``accelerated``: the upstream modules after ``dk.accelerate()`` (restored between runs).
Per view mode (Base 1024 px, a Gundam tile 640 px): stage times (patch embed, windowed blocks,
global blocks, neck+compressor, CLIP, projector) and the whole view, warm, the three runs of each
round in rotating order; ratios = upstream time / variant time, median over rounds of the ratio of
each round's pair (a shared machine's load drifts between rounds, less within one). bf16 on a CPU
without bf16 matrix units is emulated (a whole view takes minutes), so by default bf16 times one
windowed and one global SAM block (norms, Linears, attention, MLP) of each variant; ``--bf16-views``
times whole views too. Also the counted activation peak of one block call of each variant
(``MemoryTracker`` on fake tensors: exact bytes, no compute), Base and Large, fp32 and bf16.

The host load (1-minute load average) is recorded before every round. ``--threads 1`` times with
one intra-op thread and the thread's CPU time (steady on a shared machine: what the work costs, not
who else ran); the default is torch's thread count and wall time.

    cd benchmarks && python bench_cpu.py                       # writes results/cpu_vs_upstream_<threads>t.json
    python bench_cpu.py --threads 1 --repeat 3
    python bench_cpu.py --quick                                # Base fp32 view + bf16 blocks, 2 rounds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the upstream-structured stand-ins

import deepencoder_kernels as dk  # noqa: E402
from deepencoder_kernels import config as cfg  # noqa: E402
from deepencoder_kernels.ops import _sdpa_blocked  # noqa: E402
from deepencoder_kernels.profiler import MemoryTracker, random_encoder  # noqa: E402
from upstream import UpstreamClipAttention, UpstreamImageEncoderViT, UpstreamProjector  # noqa: E402

from common import RESULTS, device_info  # noqa: E402

STAGES = ("patch embed", "windowed blocks", "global blocks", "neck+compressor", "CLIP", "projector")
VARIANTS = ("upstream", "package", "accelerated")
VIEW_SIDES = {"base": 1024, "tile640": 640}


# ---- upstream's CLIP-L (clip_sdpa.py's structure) and the whole model -------------------------------

def upstream_clip_positions(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """CLIP's [257, C] positions for ``tokens`` (CLS + a square grid): the grid part resized bicubic with
    antialias in fp32 and cast back, the CLS position kept (upstream's get_abs_pos for CLIP)."""
    if pos.shape[0] == tokens:
        return pos[None]
    src, dst, dim = math.isqrt(pos.shape[0] - 1), math.isqrt(tokens - 1), pos.shape[-1]
    grid = pos[1:].view(1, src, src, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", antialias=True, align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(dst * dst, dim)])[None]


class UpstreamClipEmbeddings(nn.Module):
    def __init__(self, dim=cfg.CLIP_DIM):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(3, dim, cfg.CLIP_PATCH, cfg.CLIP_PATCH, bias=False)   # in the checkpoint, unused
        n = cfg.CLIP_POS_GRID ** 2 + 1
        self.position_embedding = nn.Embedding(n, dim)
        self.register_buffer("position_ids", torch.arange(n)[None], persistent=False)

    def forward(self, pixels, patch_embeds):
        x = patch_embeds.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + upstream_clip_positions(self.position_embedding(self.position_ids)[0], x.shape[1])


class UpstreamClipMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))   # quick_gelu


class UpstreamClipBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=cfg.CLIP_LN_EPS)
        self.self_attn = UpstreamClipAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=cfg.CLIP_LN_EPS)
        self.mlp = UpstreamClipMLP(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class UpstreamClipTransformer(nn.Module):
    def __init__(self, dim, depth, heads, hidden):
        super().__init__()
        self.layers = nn.ModuleList(UpstreamClipBlock(dim, heads, hidden) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class UpstreamVitModel(nn.Module):
    """``vision_model(pixels, sam_features)``: embeddings, pre_layrnorm (sic), 24 layers, no final norm."""

    def __init__(self, dim=cfg.CLIP_DIM, depth=cfg.CLIP_DEPTH, heads=cfg.CLIP_HEADS, hidden=cfg.CLIP_MLP_DIM):
        super().__init__()
        self.embeddings = UpstreamClipEmbeddings(dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=cfg.CLIP_LN_EPS)
        self.transformer = UpstreamClipTransformer(dim, depth, heads, hidden)

    def forward(self, pixels, patch_embeds):
        return self.transformer(self.pre_layrnorm(self.embeddings(pixels, patch_embeds)))


FULL_SIZE = dict(sam=dict(dim=cfg.SAM_DIM, depth=cfg.SAM_DEPTH, num_heads=cfg.SAM_HEADS, window_size=cfg.SAM_WINDOW,
                          global_blocks=cfg.SAM_GLOBAL_BLOCKS, pos_grid=cfg.SAM_POS_GRID, cn=cfg.SAM_NECK_DIM, c3=cfg.SAM_OUT_DIM),
                 clip=dict(dim=cfg.CLIP_DIM, depth=cfg.CLIP_DEPTH, heads=cfg.CLIP_HEADS, hidden=cfg.CLIP_MLP_DIM),
                 projector=(cfg.PROJ_IN, cfg.PROJ_OUT))


class UpstreamDeepEncoderFull(nn.Module):
    """DeepSeek-OCR's vision half with the checkpoint's names, full size by default (``sizes``: the
    keyword arguments of its parts, as :data:`FULL_SIZE`; the tests build a narrow one)."""

    def __init__(self, sizes: dict = FULL_SIZE):
        super().__init__()
        self.sam_model = UpstreamImageEncoderViT(**sizes["sam"])
        self.vision_model = UpstreamVitModel(**sizes["clip"])
        self.projector = UpstreamProjector(*sizes["projector"])
        self.image_newline = nn.Parameter(torch.zeros(sizes["projector"][1]))
        self.view_seperator = nn.Parameter(torch.zeros(sizes["projector"][1]))

    def forward(self, pixels):
        """Views [B, 3, S, S] -> [B, h * (w + 1) + 1, 1280]: features, newline after every row, separator."""
        sam = self.sam_model(pixels)
        clip = self.vision_model(pixels, sam)
        feats = self.projector(torch.cat([clip[:, 1:], sam.flatten(2).permute(0, 2, 1)], dim=-1))
        B, n, D = feats.shape
        g = math.isqrt(n)
        rows = torch.cat([feats.view(B, g, g, D), self.image_newline.expand(B, g, 1, D)], dim=2).view(B, -1, D)
        return torch.cat([rows, self.view_seperator.expand(B, 1, D)], dim=1)


def upstream_sharing(enc: nn.Module, sizes: dict = FULL_SIZE) -> UpstreamDeepEncoderFull:
    """The upstream model on ``enc``'s very parameter tensors (no copy): same names, same shapes."""
    with torch.device("meta"):
        up = UpstreamDeepEncoderFull(sizes)
    up.vision_model.embeddings.register_buffer("position_ids", torch.arange(cfg.CLIP_POS_GRID ** 2 + 1)[None],
                                               persistent=False)
    for name, p in enc.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = up.get_submodule(owner) if owner else up
        if getattr(module, leaf).shape != p.shape:
            raise ValueError(f"{name}: upstream {tuple(getattr(module, leaf).shape)} vs package {tuple(p.shape)}")
        module._parameters[leaf] = p
    left = [n for n, p in up.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"upstream parameters without a package counterpart: {left[:5]}")
    return up.eval()


# ---- timing -------------------------------------------------------------------------------------

class Clock:
    """Wall time, or with one intra-op thread the calling thread's CPU time (the work itself)."""

    def __init__(self, cpu: bool):
        self.now = time.thread_time if cpu else time.perf_counter
        self.kind = "thread CPU time" if cpu else "wall time"


class StageTimes:
    """Per-stage seconds of one run: the package through its ``stage`` hook, the upstream modules
    through forward hooks: patch embed = SAM's start to its first block (patch_embed + positions),
    each block, neck+compressor = SAM's last block to its end, vision_model, projector."""

    def __init__(self, clock: Clock):
        self.clock, self.times, self._open = clock, dict.fromkeys(STAGES, 0.0), {}

    @contextlib.contextmanager
    def stage(self, name, tokens_in=0, tokens_out=0):
        t0 = self.clock.now()
        yield
        self.times[name] += self.clock.now() - t0

    def _span(self, start_module, start_hook: str, end_module, end_hook: str, name: str) -> list:
        def start(*args):
            self._open[name] = self.clock.now()

        def end(*args):
            self.times[name] += self.clock.now() - self._open.pop(name)
        register = {"pre": lambda m, f: m.register_forward_pre_hook(f), "post": lambda m, f: m.register_forward_hook(f)}
        return [register[start_hook](start_module, start), register[end_hook](end_module, end)]

    def hooks(self, up: UpstreamDeepEncoderFull) -> list:
        sam = up.sam_model
        handles = self._span(sam, "pre", sam.blocks[0], "pre", "patch embed")
        handles += self._span(sam.blocks[-1], "post", sam, "post", "neck+compressor")
        handles += self._span(up.vision_model, "pre", up.vision_model, "post", "CLIP")
        handles += self._span(up.projector, "pre", up.projector, "post", "projector")
        for b in sam.blocks:
            handles += self._span(b, "pre", b, "post", "windowed blocks" if b.window_size else "global blocks")
        return handles


def run_view(variant: str, enc, up, pixels, clock: Clock) -> tuple[float, dict]:
    st = StageTimes(clock)
    with torch.inference_mode():
        if variant == "package":
            t0 = clock.now()
            feats = enc.view_features(pixels, stage=st.stage)
            enc.layout(feats[0])
            total = clock.now() - t0
            return total, st.times
        handles = st.hooks(up)
        report = dk.accelerate(up) if variant == "accelerated" else None
        try:
            t0 = clock.now()
            up(pixels)
            total = clock.now() - t0
        finally:
            if report is not None:
                dk.restore(up)
            for h in handles:
                h.remove()
    return total, st.times


def run_block(variant: str, enc, up, x, index: int, clock: Clock) -> float:
    """One SAM block (index into the trunk) on a trunk-shaped input: norms, Linears, attention, MLP."""
    block = enc.sam_model.blocks[index] if variant == "package" else up.sam_model.blocks[index]
    report = dk.accelerate(block) if variant == "accelerated" else None
    try:
        with torch.inference_mode():
            t0 = clock.now()
            block(x)
            return clock.now() - t0
    finally:
        if report is not None:
            dk.restore(block)


def interleaved(fn, rounds: int, note) -> dict:
    """``fn(variant) -> seconds or (seconds, stages)``: one warm-up run each, then ``rounds`` rounds of
    the three in rotating order. Returns per-variant lists and the per-round load."""
    runs = {v: [] for v in VARIANTS}
    for v in VARIANTS:   # warm-up: allocator, caches, accelerate's first patch
        fn(v)
    loads = []
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            runs[v].append(fn(v))
        note(r, {v: (runs[v][-1][0] if isinstance(runs[v][-1], tuple) else runs[v][-1]) for v in VARIANTS})
    return {"runs": runs, "load_average": loads}


def ratios(up: list[float], other: list[float]) -> float:
    """Median over rounds of upstream's time / the other's (pairs from the same round)."""
    return statistics.median(u / o for u, o in zip(up, other))


def summarize(name, res: dict) -> dict:
    runs = res["runs"]
    total = {v: [r[0] if isinstance(r, tuple) else r for r in runs[v]] for v in VARIANTS}
    row = {"case": name, "rounds": len(total["upstream"]), "load_average": res["load_average"],
           "seconds": {v: statistics.median(total[v]) for v in VARIANTS},
           "speedup": {v: ratios(total["upstream"], total[v]) for v in ("package", "accelerated")}}
    if isinstance(runs["upstream"][0], tuple):
        stages = {v: {s: [r[1][s] for r in runs[v]] for s in STAGES} for v in VARIANTS}
        row["stage_seconds"] = {v: {s: statistics.median(stages[v][s]) for s in STAGES} for v in VARIANTS}
        row["stage_speedup"] = {v: {s: ratios(stages["upstream"][s], stages[v][s]) for s in STAGES if stages[v][s][0] > 0}
                                for v in ("package", "accelerated")}
    return row


# ---- counted memory of one block call -----------------------------------------------------------

def block_peaks(enc, up, side: int, index: int, dtype, part: str = "block") -> dict:
    """Peak activation bytes of one call of a SAM block (``part`` "block") or of its attention module
    ("attention": qkv Linear, attention, proj; global blocks) for each variant (MemoryTracker over fake
    tensors: every storage an op allocates, counted exactly, nothing computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = {}
    for variant in VARIANTS:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            block = enc.sam_model.blocks[index] if variant == "package" else up.sam_model.blocks[index]
            x = mode.from_tensor(torch.empty(1, side, side, block.norm1.normalized_shape[0], dtype=dtype))
            report = dk.accelerate(block) if variant == "accelerated" else None
            if part == "attention":
                # the accelerated block's attention is its patched forward minus the norms and MLP: run the
                # package module's path on upstream's parameters (what the patched forward calls)
                attn = block.attn
                call = (lambda: attn(x)) if variant != "accelerated" else (lambda: attn.proj(dk.ops.rel_pos_attention(
                    attn.qkv(x), attn.rel_pos_h, attn.rel_pos_w, attn.num_heads, 0, attn.qkv.bias)))
            else:
                call = lambda: block(x)  # noqa: E731
            try:
                with torch.inference_mode(), MemoryTracker() as t:
                    y = call()
                    del y
            finally:
                if report is not None:
                    dk.restore(block)
        out[variant] = t.peak
    return out


# ---- the packed varlen op: encode_batch's SAM global blocks and CLIP, DeepEncoder V2's causal flow ------

def varlen_cases(dtype, g) -> dict:
    """Packed calls as the encoders make them, for the op on ``reference`` (upstream's computation:
    a dense bias / mask per sequence, padded chunks) and on this CPU's auto backend."""
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.5).to(dtype)  # noqa: E731
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    cases = {}
    grids = [(32, 32), (40, 40), (64, 64)]          # Tiny + Small + Base views' SAM global attention, packed
    n = [h * w for h, w in grids]
    cases["SAM global, packed Tiny+Small+Base grids"] = (
        (rnd(sum(n), 12, 64), rnd(sum(n), 12, 64), rnd(sum(n), 12, 64), cu(n), max(n)),
        dict(rel_pos_h=rnd(127, 64), rel_pos_w=rnd(127, 64), grid_hw=torch.tensor(grids, dtype=torch.int32)))
    n = [65, 101, 257, 401, 101, 101]               # CLIP over Tiny, Small, Base, Large and two Gundam tiles
    cases["CLIP, packed mixed lengths"] = ((rnd(sum(n), 16, 64), rnd(sum(n), 16, 64), rnd(sum(n), 16, 64), cu(n), max(n)), {})
    n, p = [512, 288, 288], [256, 144, 144]         # V2: a 1024 view + two 768 tiles, [image tokens; queries]
    cos, sin = dk.reference.rope_tables(512, 64, cfg.CAUSAL_FLOW_ROPE_THETA, dtype)
    cases["V2 causal flow, prefix-LM (1024 view + two 768 tiles)"] = (
        (rnd(sum(n), cfg.CAUSAL_FLOW_HEADS, 64), rnd(sum(n), cfg.CAUSAL_FLOW_KV_HEADS, 64), rnd(sum(n), cfg.CAUSAL_FLOW_KV_HEADS, 64),
         cu(n), max(n)), dict(prefix_lens=torch.tensor(p, dtype=torch.int32), rope_cos=cos, rope_sin=sin))
    return cases


def run_varlen(clock: Clock, rounds: int, dtype, g, log, cases=varlen_cases) -> list[dict]:
    rows = []
    for name, (args, kwargs) in cases(dtype, g).items():
        def call(kind):
            with torch.inference_mode(), dk.backend(kind):
                t0 = clock.now()
                dk.ops.varlen_attention(*args, check_values=False, **kwargs)
                return clock.now() - t0
        call("reference"), call("auto")
        backend = dk.last_backends()["varlen_attention"].backend
        pairs = [(call("reference"), call("auto")) for _ in range(rounds)]
        rows.append({"case": f"varlen/{str(dtype).replace('torch.', '')}/{name}", "backend": backend, "rounds": rounds,
                     "seconds": {"reference": statistics.median(r for r, _ in pairs), backend: statistics.median(o for _, o in pairs)},
                     "speedup_vs_reference": statistics.median(r / o for r, o in pairs), "load_average": [os.getloadavg()[0]]})
        log(f"  {rows[-1]['case']}: reference {rows[-1]['seconds']['reference'] * 1e3:.1f} ms, {backend} "
            f"{rows[-1]['seconds'][backend] * 1e3:.1f} ms ({rows[-1]['speedup_vs_reference']:.2f}x)")
    return rows


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's); 1 times thread CPU time")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per case (after one warm-up run of each variant)")
    ap.add_argument("--views", default="base,tile640", help="comma-separated: base, tile640")
    ap.add_argument("--bf16-views", action="store_true", help="also time whole views in bf16 (minutes each where bf16 is emulated)")
    ap.add_argument("--quick", action="store_true", help="Base fp32 view and bf16 blocks, 2 rounds")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--out", default=None, help="result name (default cpu_vs_upstream_<threads>t)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    clock = Clock(cpu=threads == 1)
    rounds = 2 if args.quick else args.repeat
    views = ["base"] if args.quick else args.views.split(",")
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"threads {threads}, {clock.kind}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    rows = []
    dtypes = [getattr(torch, n) for n in args.dtypes.split(",")]
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        enc = random_encoder(dtype=dtype).eval()
        up = upstream_sharing(enc)
        g = torch.Generator().manual_seed(0)
        if dtype == torch.float32 or args.bf16_views:
            for view in views:
                side = VIEW_SIDES[view]
                pixels = (torch.rand(1, 3, side, side, generator=g) * 2 - 1).to(dtype)
                with torch.inference_mode():
                    want, got = up(pixels), enc.encode_pixels(pixels)
                diff = (want.float() - got.float()).abs().max().item()
                log(f"{view} {name}: package vs upstream max |diff| {diff:.3g}")
                res = interleaved(lambda v: run_view(v, enc, up, pixels, clock), rounds,
                                  lambda r, t: log(f"  {view} {name} round {r}: " + ", ".join(f"{v} {s:.2f}s" for v, s in t.items())))
                rows.append({**summarize(f"{view}/{name}/view", res), "max_abs_diff": diff})
        x = (torch.randn(1, 64, 64, cfg.SAM_DIM, generator=g) * 0.5).to(dtype)
        for kind, index in (("windowed", 0), ("global", cfg.SAM_GLOBAL_BLOCKS[0])):
            res = interleaved(lambda v: run_block(v, enc, up, x, index, clock), rounds,
                              lambda r, t: log(f"  base {name} {kind} block round {r}: " + ", ".join(f"{v} {s:.2f}s" for v, s in t.items())))
            rows.append(summarize(f"base/{name}/{kind} block", res))
        for mode, side in (("base", 64), ("large", 80)):
            for kind, index, part in (("windowed", 0, "block"), ("global", cfg.SAM_GLOBAL_BLOCKS[0], "block"),
                                      ("global", cfg.SAM_GLOBAL_BLOCKS[0], "attention")):
                rows.append({"case": f"{mode}/{name}/{kind} {part}/peak bytes", "peak_bytes": block_peaks(enc, up, side, index, dtype, part)})
        del enc, up
        rows += run_varlen(clock, max(3, rounds), dtype, g, log)

    meta = {"threads": threads, "clock": clock.kind, "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "attention_compute_dtype": {str(d).replace("torch.", ""): str(_sdpa_blocked.compute_dtype(d)).replace("torch.", "")
                                        for d in dtypes},
            "bias_block_elements": _sdpa_blocked.bias_budget(), "backends": {op: c.backend for op, c in dk.last_backends().items()},
            "command": "python bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.out or f'cpu_vs_upstream_{threads}t'}.json"
    path.write_text(json.dumps({**device_info(), **meta, "rows": rows}, indent=1))
    for row in rows:
        if "speedup_vs_reference" in row:
            log(f"{row['case']:<60} {row['speedup_vs_reference']:.2f}x vs the reference")
        elif "speedup" in row:
            log(f"{row['case']:<28} upstream {row['seconds']['upstream']:.2f}s  package {row['speedup']['package']:.2f}x  "
                f"accelerated {row['speedup']['accelerated']:.2f}x  (load {statistics.median(row['load_average']):.1f})")
        else:
            log(f"{row['case']:<40} " + ", ".join(f"{v} {b / 2**20:.0f} MiB" for v, b in row["peak_bytes"].items()))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
