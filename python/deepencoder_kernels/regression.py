"""Benchmark-regression gate: the figures of this package that are deterministic or measurable on
a CPU, compared against a committed baseline with a readable diff.

- ``flops``: FLOPs per encoder stage and mode, v1 and V2 (counted on the meta device: exact, deterministic);
- ``allocated``: activation bytes each op allocates (``MemoryTracker``): the reference backends at
  real DeepEncoder shapes and the fused launchers (in Triton's interpreter, which allocates nothing
  itself) at reduced shapes. Exact: any growth fails;
- ``cpu_speedup``: the C++ saccade op vs ``torch.topk`` + ``torch.gather``, timed side by side;
  noisy on shared machines, so it fails only below ``margin`` x the baseline (or below 1x);
- ``gpu``: figures per device name, compared only against the same device.
The static kernel report (registers, spills, shared memory, tensor cores) has its own gate
(``deepencoder-kernels static-report --check``); CI runs both.

    deepencoder-kernels regression --check benchmarks/baselines/regression.json
    deepencoder-kernels regression --write benchmarks/baselines/regression.json
"""
from __future__ import annotations

import importlib
import json
import statistics
import sys
import time

import torch

from . import config as cfg
from . import dispatch

SPEEDUP_MARGIN = 0.25  # shared 2-core CI machines: a speed-up may fall to a quarter of its baseline (seen: 8.8x -> 3.5x under load)
MODE_SIDES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280}


V2_PAGES = {"v2/base": ("base", None), "v2/dynamic-2x3": ("dynamic", (1536, 2304))}   # a 1024 view; + six 768 tiles


def flops_per_stage() -> dict:
    from PIL import Image

    from .modules import DeepEncoder, DeepEncoderV2
    from .profiler import profile

    with torch.device("meta"):
        enc, enc_v2 = DeepEncoder().to(torch.bfloat16), DeepEncoderV2().to(torch.bfloat16)
    out = {mode: {s.name: s.flops for s in profile(mode, encoder=enc, device="meta", progress=False).stages}
           for mode in MODE_SIDES}
    for key, (mode, size) in V2_PAGES.items():
        page = Image.new("RGB", size, "white") if size else None
        out[key] = {s.name: s.flops for s in profile(mode, page, encoder=enc_v2, device="meta", progress=False).stages}
    return out


def _allocated(fn) -> int:
    from .profiler import MemoryTracker

    with torch.inference_mode(), MemoryTracker() as t:
        out = fn()
        del out
    return t.total


def allocated_per_op() -> dict:
    """Bytes allocated per op call: reference backends at Base shapes (bf16, batch 1); the fused
    launchers at reduced shapes through Triton's interpreter when this process runs it."""
    from . import reference as ref

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    side, C, d = cfg.sam_grid(1024), cfg.SAM_DIM, cfg.HEAD_DIM
    out = {}
    qkv = rnd(1, side, side, 3 * C)
    for block, window, rows in (("windowed", cfg.SAM_WINDOW, 27), ("global", 0, 127)):
        th, tw, pad = rnd(rows, d), rnd(rows, d), rnd(3 * C) if window else None
        out[f"rel_pos_attention/reference/base/{block}"] = _allocated(
            lambda: ref.rel_pos_attention(qkv, th, tw, cfg.SAM_HEADS, window, pad))
    x = rnd(1, side, side, C)
    neck = [rnd(256, C, 1, 1), rnd(256), rnd(256), rnd(256, 256, 3, 3), rnd(256), rnd(256), rnd(512, 256, 3, 3), rnd(1024, 512, 3, 3)]
    out["compress/reference/base"] = _allocated(lambda: ref.compress(x, *neck))
    lengths = [65, 101, 257, 401]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = rnd(sum(lengths), cfg.CLIP_HEADS, cfg.CLIP_DIM // cfg.CLIP_HEADS)
    out["varlen_attention/reference/clip-mixed"] = _allocated(lambda: ref.varlen_attention(q, q, q, cu, 401))
    from .extension import MISSING

    if MISSING is None:
        saccade = importlib.import_module("deepencoder_kernels.ops.saccade_gather")
        s, f, k = torch.randn(8, 4096, generator=g), rnd(8, 4096, 768), torch.full((8,), 273)
        out["saccade_gather/cpp/8x4096x768"] = _allocated(lambda: saccade._saccade_gather_cpp(s, f, k, None, False))
    if dispatch.triton_interpret_mode():
        out.update(_fused_allocations(rnd))
    return out


def _fused_allocations(rnd) -> dict:
    attention = importlib.import_module("deepencoder_kernels.ops.rel_pos_attention")
    compress = importlib.import_module("deepencoder_kernels.ops.compress")
    varlen = importlib.import_module("deepencoder_kernels.ops.varlen_attention")
    out = {}
    qkv, th, tw, pad = rnd(1, 16, 16, 3 * 128), rnd(7, 64), rnd(7, 64), rnd(3 * 128)
    attention.sequence_tables(th, tw, 4, 4)
    out["rel_pos_attention/triton/16x16-window4"] = _allocated(lambda: attention._fused(qkv, th, tw, 2, 4, pad, interpret=True))
    x = rnd(1, 16, 16, 64)
    neck = [rnd(32, 64, 1, 1), rnd(32), rnd(32), rnd(32, 32, 3, 3), rnd(32), rnd(32), rnd(64, 32, 3, 3), rnd(128, 64, 3, 3)]
    # includes the weights re-laid-out for the kernel (kkio), made at every call (ops._common.derived)
    out["compress/triton/16x16"] = _allocated(lambda: compress._fused(x, *neck, 1e-6, interpret=True))
    cu = torch.tensor([0, 5, 69, 70], dtype=torch.int32)
    q = rnd(70, 2, 32)
    out["varlen_attention/triton/mixed"] = _allocated(lambda: varlen._fused(q, q, q, cu, 64, None, None, None, None, 0, interpret=True))
    return out


def cpu_speedups(repeats: int = 31) -> dict:
    """The saccade op vs torch.topk + torch.gather, median of interleaved runs, at two real shapes."""
    saccade = importlib.import_module("deepencoder_kernels.ops.saccade_gather")
    from .extension import MISSING

    if MISSING is not None:
        return {}
    out = {}
    for B, N, C, k in ((8, 4096, 768, 273), (32, 256, 1024, 64)):
        g = torch.Generator().manual_seed(0)
        s, f = torch.randn(B, N, generator=g), torch.randn(B, N, C, generator=g).to(torch.bfloat16)
        kk = torch.full((B,), k)
        ours = lambda: saccade._saccade_gather_cpp(s, f, kk, None, False)  # noqa: E731
        theirs = lambda: torch.gather(f, 1, torch.topk(s, k, dim=1).indices.unsqueeze(-1).expand(-1, -1, C))  # noqa: E731
        out[f"saccade_gather/{B}x{N}x{C}/k{k}"] = speedup(ours, theirs, repeats)
    return out


def speedup(ours, theirs, repeats: int) -> float:
    """Median over interleaved pairs of (their time / our time)."""
    ours(), theirs()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def collect() -> dict:
    return {"flops": flops_per_stage(), "allocated": allocated_per_op(), "cpu_speedup": cpu_speedups(), "gpu": {}}


def compare(current: dict, baseline: dict, margin: float = SPEEDUP_MARGIN) -> list[str]:
    """Every regression, as a readable line."""
    problems = []
    for mode, stages in baseline.get("flops", {}).items():
        for stage, want in stages.items():
            got = current.get("flops", {}).get(mode, {}).get(stage)
            if got != want:
                problems.append(f"flops {mode}/{stage}: {want / 1e9:.3f} -> {'missing' if got is None else f'{got / 1e9:.3f}'} GFLOPs")
    for case, want in baseline.get("allocated", {}).items():
        got = current.get("allocated", {}).get(case)
        if got is None:
            if case.split("/")[1] == "triton" and not any(c.split("/")[1] == "triton" for c in current.get("allocated", {})):
                continue   # fused launchers are measured only where the interpreter runs
            problems.append(f"allocated {case}: no longer measured")
        elif got > want:
            problems.append(f"allocated {case}: {want:,} -> {got:,} bytes (+{(got - want) / want:.1%})")
    for case, want in baseline.get("cpu_speedup", {}).items():
        got = current.get("cpu_speedup", {}).get(case)
        if got is None:
            problems.append(f"cpu_speedup {case}: no longer measured")
        elif got < max(1.0, want * margin):
            problems.append(f"cpu_speedup {case}: {want:.2f}x -> {got:.2f}x (gate: >= max(1, {margin:g} x baseline))")
    device = _gpu_name()
    for case, want in baseline.get("gpu", {}).get(device, {}).items() if device else ():
        got = current.get("gpu", {}).get(device, {}).get(case)
        if got is not None and got > want * (1 + margin):
            problems.append(f"gpu {device} {case}: {want:.3f} -> {got:.3f} ms")
    return problems


def _gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="deepencoder-kernels regression", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", help="baseline JSON to compare against (exit 1 on a regression)")
    ap.add_argument("--write", help="write the current figures as the baseline")
    args = ap.parse_args(argv)
    current = collect()
    for section in ("allocated", "cpu_speedup"):
        for case, value in current[section].items():
            print(f"{section:<12} {case:<48} {value:,.2f}" if isinstance(value, float) else f"{section:<12} {case:<48} {value:,}")
    if args.write:
        with open(args.write, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
        print(f"wrote {args.write}")
    if args.check:
        with open(args.check) as f:
            problems = compare(current, json.load(f))
        if problems:
            print("\nREGRESSION CHECK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print("regression check: FLOPs, allocations and CPU speed-ups within the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
