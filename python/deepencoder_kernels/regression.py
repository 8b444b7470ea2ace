"""Benchmark-regression gate: the figures of this package that are deterministic or measurable on
a CPU, compared against a committed baseline with a readable diff.

- ``flops``: FLOPs per encoder stage and mode, v1 and V2 (counted on the meta device: exact, deterministic);
- ``allocated``: activation bytes each op allocates (``MemoryTracker``): the reference backends at
  real DeepEncoder shapes and the fused launchers (in Triton's interpreter, which allocates nothing
  itself) at reduced shapes. Exact: any growth fails;
- ``cpu_speedup``: the C++ saccade op vs ``torch.topk`` + ``torch.gather``, timed side by side;
  noisy on shared machines, so it fails only below ``margin`` x the baseline (or below 1x);
- ``cpu_vs_upstream``: the CPU attention backend (``sdpa-blocked``) vs upstream's own attention code
  (DeepSeek's ``sam_vary_sdpa.py`` op order: padded windows, reshape-copied q/k/v, two einsums, the
  dense bias, SDPA), a Base global and windowed block's attention, fp32 and bf16, one intra-op thread
  and the thread's CPU time (steady on a loaded machine); gated as ``cpu_speedup`` (never below 1x:
  the package's CPU path must not be slower than the code it replaces). Whole views:
  ``benchmarks/bench_cpu.py``;
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
    out.update(_blocked_allocations())
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


def _blocked_allocations() -> dict:
    """The CPU attention backend's bytes at Base, fp32 (its compute dtype everywhere), the default bias
    block (not the thread-scaled one), counted on fake tensors (exact, nothing computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    blocked = importlib.import_module("deepencoder_kernels.ops._sdpa_blocked")
    side, C, d = cfg.sam_grid(1024), cfg.SAM_DIM, cfg.HEAD_DIM
    out = {}
    for block, window, rows in (("windowed", cfg.SAM_WINDOW, 27), ("global", 0, 127)):
        with FakeTensorMode():
            qkv, th, tw, pad = torch.empty(1, side, side, 3 * C), torch.empty(rows, d), torch.empty(rows, d), torch.empty(3 * C)
            out[f"rel_pos_attention/sdpa-blocked/base/{block}"] = _allocated(lambda: blocked.rel_pos_attention(
                qkv, th, tw, cfg.SAM_HEADS, window, pad if window else None, budget=blocked.BIAS_BLOCK_ELEMENTS))
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


def speedup(ours, theirs, repeats: int, clock=time.perf_counter) -> float:
    """Median over interleaved pairs of (their time / our time), timed with ``clock``."""
    ours(), theirs()
    ratios = []
    for _ in range(repeats):
        t0 = clock()
        ours()
        t1 = clock()
        theirs()
        t2 = clock()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def _upstream_rel_pos_attention(qkv, rel_pos_h, rel_pos_w, num_heads: int, window: int, pad_kv):
    """Upstream SAM attention between its qkv and proj Linears, in the order of operations of DeepSeek's
    ``sam_vary_sdpa.py`` (written to its structure, independent of the package's reference): windows
    padded and cut with a contiguous copy (padded tokens' qkv = the qkv bias, as a zero-padded normed
    token gives), q/k/v reshape-copied per head, the tables looked up, two einsums reshaped to
    [.., N, h, 1] and [.., N, 1, w], their broadcast sum as the dense mask of SDPA."""
    B, H, W, C3 = qkv.shape
    if window:
        Hp, Wp = -(-H // window) * window, -(-W // window) * window
        padded = pad_kv.expand(B, Hp, Wp, C3).clone()
        padded[:, :H, :W] = qkv
        qkv = padded.view(B, Hp // window, window, Wp // window, window, C3).permute(0, 1, 3, 2, 4, 5)
        qkv = qkv.contiguous().view(-1, window, window, C3)
    S, h, w, _ = qkv.shape
    n = h * w
    q, k, v = qkv.reshape(S, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4).reshape(3, S * num_heads, n, -1).unbind(0)

    def lookup(size, table):   # tables as the checkpoint has them for these grids: no resize
        if table.shape[0] != 2 * size - 1:
            raise ValueError(f"a rel-pos table of {table.shape[0]} rows for a side of {size}: expected {2 * size - 1}")
        coords = torch.arange(size)
        return table[coords[:, None] - coords[None, :] + size - 1]
    r_q = q.reshape(S * num_heads, h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, lookup(h, rel_pos_h)).unsqueeze(-1).reshape(S * num_heads, n, h, 1)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, lookup(w, rel_pos_w)).unsqueeze(-2).reshape(S * num_heads, n, 1, w)
    bias = (rel_h + rel_w).view(S, num_heads, n, n)
    q, k, v = (t.view(S, num_heads, n, -1) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.view(S, num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(S, h, w, -1)
    if window:
        out = out.view(B, Hp // window, Wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
        out = out.contiguous().view(B, Hp, Wp, -1)[:, :H, :W].contiguous()
    return out


def cpu_vs_upstream(repeats: int = 3) -> dict:
    """Upstream's attention time / the op's on its CPU auto backend, median of interleaved pairs, one
    intra-op thread, thread CPU time: a Base global and windowed block, fp32 and bf16 (seeded inputs
    at the checkpoint's shapes: tables of 127 / 27 rows, the qkv bias as pad_kv)."""
    from . import ops

    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        side, C, d = cfg.sam_grid(1024), cfg.SAM_DIM, cfg.HEAD_DIM
        qkv32 = torch.randn(1, side, side, 3 * C, generator=g) * 0.5
        for dtype in (torch.float32, torch.bfloat16):
            qkv = qkv32.to(dtype)
            for block, window, rows in (("global", 0, 2 * cfg.SAM_POS_GRID - 1), ("windowed", cfg.SAM_WINDOW, 2 * cfg.SAM_WINDOW - 1)):
                th, tw = ((torch.randn(rows, d, generator=g) * 0.3).to(dtype) for _ in range(2))
                pad = (torch.randn(3 * C, generator=g) * 0.5).to(dtype)
                ours = lambda: ops.rel_pos_attention(qkv, th, tw, cfg.SAM_HEADS, window, pad if window else None)  # noqa: E731
                theirs = lambda: _upstream_rel_pos_attention(qkv, th, tw, cfg.SAM_HEADS, window, pad)  # noqa: E731
                with torch.inference_mode():
                    name = str(dtype).replace("torch.", "")
                    out[f"rel_pos_attention/base/{block}/{name}"] = speedup(
                        ours, theirs, repeats if block == "global" else 3 * repeats, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    return out


def collect() -> dict:
    return {"flops": flops_per_stage(), "allocated": allocated_per_op(), "cpu_speedup": cpu_speedups(),
            "cpu_vs_upstream": cpu_vs_upstream(), "gpu": {}}


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
    for section in ("cpu_speedup", "cpu_vs_upstream"):
        for case, want in baseline.get(section, {}).items():
            got = current.get(section, {}).get(case)
            if got is None:
                problems.append(f"{section} {case}: no longer measured")
            elif got < max(1.0, want * margin):
                problems.append(f"{section} {case}: {want:.2f}x -> {got:.2f}x (gate: >= max(1, {margin:g} x baseline))")
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
    for section in ("allocated", "cpu_speedup", "cpu_vs_upstream"):
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
