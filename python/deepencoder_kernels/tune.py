"""Tuner: for each Triton kernel at DeepEncoder's real shapes, every candidate launch config in
``kernels/configs.py`` (``CANDIDATES``) is checked against the reference, then timed; the winners
are written per device into ``kernels/tuned/<device>.json``, which the launchers read on that
device (every other device keeps the defaults).

    deepencoder-kernels tune [--quick] [--out F]       # on a GPU
    deepencoder-kernels tune --dry-run --out F         # same loop on the CPU: interpreter, small shapes

A candidate is timed only if the static report for the running Triton compiled it cleanly for
this GPU's target (0 spills, shared memory within the limit; ``static_report_triton-<X.Y>.json``)
and its output matches the reference within the dtype's tolerance. Timing: CUDA events around
each call, warm-up calls (compilation included) excluded, median of the repeats.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import config as cfg
from . import dispatch, reference

ROOT = Path(__file__).resolve().parents[2]
STATIC_BASELINE = ROOT / "benchmarks" / "baselines" / "static_report.json"


@dataclass
class Case:
    """One tuning key: a kernel entry at one shape, its inputs, the fused call and the oracle."""

    kernel: str                                   # "rel_pos_attention" | "varlen_attention" | "compress"
    entry: str                                    # the configs.py entry (CANDIDATES[kernel][entry])
    key: str                                      # the tuned table's key (configs.tuning_key)
    label: str                                    # what the shape is, for people
    make: Callable[[], tuple]                     # -> inputs
    fused: Callable[..., torch.Tensor]            # inputs -> output through the fused kernel
    oracle: Callable[..., torch.Tensor]           # inputs -> reference output (fp32)
    op: str | None = None                         # the dispatcher's op name, to check the fused backend ran
    lp: int = 0                                   # rel-pos table rows on chip (candidates' MAX_LP)


@dataclass
class Result:
    candidate: int
    config: dict
    median_ms: float | None = None
    repeats: int = 0
    skipped: str = ""                             # why it was not timed (static report, mismatch, error)
    max_abs_err: float | None = None


@dataclass
class Setup:
    device: torch.device
    backend: str                                  # "triton" or "triton-interpret"
    dtype: torch.dtype
    reduced: bool                                 # small shapes (the CPU dry run)
    warmup: int = 3
    repeats: int = 20
    static_rows: dict = field(default_factory=dict)   # config name -> [rows] for this GPU's target


# ---- the cases ---------------------------------------------------------------------------------


def _rel_pos_case(s: Setup, mode: str, block: str, batch: int) -> Case:
    from .kernels.configs import next_pow2, tuning_key

    if s.reduced:   # one head of the real head_dim; 2 x 2 windows of 6, the last ones padded; a small global grid
        side, heads, window = (10, 1, 6) if block == "windowed" else (10, 1, 0)
    else:
        side, heads, window = cfg.sam_grid({"tiny": 512, "small": 640, "base": 1024, "large": 1280}[mode]), cfg.SAM_HEADS, \
            (cfg.SAM_WINDOW if block == "windowed" else 0)
    d = cfg.HEAD_DIM
    seq = window or side

    def make():
        g = torch.Generator().manual_seed(0)
        rows = 2 * (window or cfg.SAM_POS_GRID) - 1
        qkv = torch.randn(batch, side, side, 3 * heads * d, generator=g).mul_(0.5)
        th, tw = (torch.randn(rows, d, generator=g).mul_(0.3) for _ in range(2))
        pad = torch.randn(3 * heads * d, generator=g).mul_(0.5) if window else None
        to = lambda t: None if t is None else t.to(s.device, s.dtype)  # noqa: E731
        return to(qkv), to(th), to(tw), heads, window, to(pad)

    def fused(qkv, th, tw, heads, window, pad):
        from . import ops

        return ops.rel_pos_attention(qkv, th, tw, num_heads=heads, window_size=window, pad_kv=pad)

    def oracle(qkv, th, tw, heads, window, pad):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return reference.rel_pos_attention(f(qkv), f(th), f(tw), heads, window, f(pad))

    return Case("rel_pos_attention", block, tuning_key("rel_pos_attention", block, seq, seq),
                f"{'reduced' if s.reduced else mode}/{block} b{batch} grid {side}", make, fused, oracle, "rel_pos_attention",
                lp=max(16, next_pow2(2 * seq - 1)))


def _varlen_case(s: Setup, kind: str, batch: int) -> Case:
    """CLIP over a packed mixed batch (no bias), or SAM global blocks packed across grids (rel-pos)."""
    from .kernels.configs import tuning_key

    if kind == "clip":
        heads, d = (2, cfg.CLIP_DIM // cfg.CLIP_HEADS) if s.reduced else (cfg.CLIP_HEADS, cfg.CLIP_DIM // cfg.CLIP_HEADS)
        lengths = [17, 5, 33] if s.reduced else [(cfg.compressed_grid(sz) ** 2 + 1) for sz in (512, 640, 1024, 1280)] * batch
        grids, entry, key = None, "plain", tuning_key("varlen_attention", "plain")
    else:
        heads, d = (1, cfg.HEAD_DIM) if s.reduced else (cfg.SAM_HEADS, cfg.HEAD_DIM)
        sides = [4, 7, 6] if s.reduced else [cfg.sam_grid(sz) for sz in ((512, 640, 1024) if kind == "<=base" else (512, 640, 1024, 1280))] * batch
        grids = [(h, h) for h in sides]
        lengths = [h * w for h, w in grids]
        side = max(sides)
        entry, key = "rel_pos", tuning_key("varlen_attention", "rel_pos", side, side)

    def make():
        g = torch.Generator().manual_seed(0)
        total = sum(lengths)
        q, k, v = (torch.randn(total, heads, d, generator=g).to(s.device, s.dtype) for _ in range(3))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(s.device)
        if grids is None:
            return q, k, v, cu, max(lengths), None, None, None
        rows = 2 * cfg.SAM_POS_GRID - 1
        th, tw = (torch.randn(rows, d, generator=g).mul_(0.3).to(s.device, s.dtype) for _ in range(2))
        return q, k, v, cu, max(lengths), th, tw, torch.tensor(grids, dtype=torch.int32, device=s.device)

    def fused(q, k, v, cu, max_seqlen, th, tw, grid_hw):
        from . import ops

        return ops.varlen_attention(q, k, v, cu, max_seqlen, rel_pos_h=th, rel_pos_w=tw, grid_hw=grid_hw,
                                    max_side=None if grids is None else max(max(hw) for hw in grids))

    def oracle(q, k, v, cu, max_seqlen, th, tw, grid_hw):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return reference.varlen_attention(f(q), f(k), f(v), cu, max_seqlen, None, f(th), f(tw), grid_hw)

    label = f"{'reduced' if s.reduced else 'real'} {kind} packed, {len(lengths)} sequences"
    return Case("varlen_attention", entry, key, label, make, fused, oracle, "varlen_attention")


def _causal_flow_case(s: Setup, batch: int) -> Case:
    """DeepEncoder V2's causal-flow attention: pages of six 768 tiles (288 tokens) and a 1024 global
    view (512) packed, prefix-LM (prefix = n image tokens), GQA 14 / 2, RoPE on load, d = 64."""
    from .kernels.configs import tuning_key

    if s.reduced:   # one kv head of the real head_dim with its 2 query heads; short sequences, odd prefixes
        heads, kv_heads, ns = 2, 1, [5, 9, 5]
    else:
        heads, kv_heads, ns = cfg.CAUSAL_FLOW_HEADS, cfg.CAUSAL_FLOW_KV_HEADS, ([144] * 6 + [256]) * batch
    d = cfg.HEAD_DIM
    lengths = [2 * n for n in ns]

    def make():
        g = torch.Generator().manual_seed(0)
        total = sum(lengths)
        q = torch.randn(total, heads, d, generator=g).mul_(0.5).to(s.device, s.dtype)
        k, v = (torch.randn(total, kv_heads, d, generator=g).mul_(0.5).to(s.device, s.dtype) for _ in range(2))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(s.device)
        prefix = torch.tensor(ns, dtype=torch.int32, device=s.device)
        cos, sin = reference.rope_tables(max(lengths), d, cfg.CAUSAL_FLOW_ROPE_THETA, s.dtype, s.device)
        return q, k, v, cu, max(lengths), prefix, cos, sin

    def fused(q, k, v, cu, max_seqlen, prefix, cos, sin):
        from . import ops

        return ops.varlen_attention(q, k, v, cu, max_seqlen, prefix_lens=prefix, rope_cos=cos, rope_sin=sin, check_values=False)

    def oracle(q, k, v, cu, max_seqlen, prefix, cos, sin):
        return reference.varlen_attention(q.float(), k.float(), v.float(), cu, max_seqlen, prefix_lens=prefix, rope_cos=cos,
                                          rope_sin=sin)

    label = f"{'reduced' if s.reduced else 'real'} causal flow, {len(ns)} views (prefix-LM, GQA {heads}/{kv_heads}, RoPE)"
    return Case("varlen_attention", "prefix", tuning_key("varlen_attention", "prefix"), label, make, fused, oracle, "varlen_attention")


COMPRESS_STEPS = {  # name: (kernel size, stride, padding, LayerNorm after, C_in, C_out)
    "neck_1x1_ln": (1, 1, 0, True, cfg.SAM_DIM, cfg.SAM_NECK_DIM),
    "neck_3x3_ln": (3, 1, 1, True, cfg.SAM_NECK_DIM, cfg.SAM_NECK_DIM),
    "net2_3x3_s2": (3, 2, 1, False, cfg.SAM_NECK_DIM, cfg.SAM_OUT_DIM // 2),
    "net3_3x3_s2": (3, 2, 1, False, cfg.SAM_OUT_DIM // 2, cfg.SAM_OUT_DIM),
}


def _compress_case(s: Setup, name: str, batch: int) -> Case:
    """One conv of the chain at Base's grid (its input is the previous step's output size)."""
    ksize, stride, pad, has_ln, c_in, c_out = COMPRESS_STEPS[name]
    if s.reduced:   # full channel counts would crawl in the interpreter; keep every edge (partial tiles, stride, padding)
        c_in, c_out, side = min(c_in, 48), min(c_out, 40), 9
    else:
        side = cfg.sam_grid(1024) // (2 if name == "net3_3x3_s2" else 1)
    eps = 1e-6

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, side, side, c_in, generator=g)
        w = torch.randn(c_out, c_in, ksize, ksize, generator=g).mul_((c_in * ksize * ksize) ** -0.5)
        ln = (torch.randn(c_out, generator=g).mul_(0.2).add_(1), torch.randn(c_out, generator=g).mul_(0.2)) if has_ln else None
        to = lambda t: t.to(s.device, s.dtype)  # noqa: E731
        return to(x), to(w), None if ln is None else tuple(map(to, ln))

    def fused(x, w, ln):
        from .kernels.compress import conv_nhwc
        from .ops.compress import kkio

        return conv_nhwc(x, kkio(w), stride, pad, name, ln, eps, interpret=s.backend == "triton-interpret")

    def oracle(x, w, ln):
        y = F.conv2d(x.permute(0, 3, 1, 2).float(), w.float(), stride=stride, padding=pad)
        if ln is not None:
            y = reference.layer_norm_2d(y, ln[0].float(), ln[1].float(), eps)
        return y.permute(0, 2, 3, 1)

    return Case("compress", name, name, f"{'reduced' if s.reduced else 'base'} {name} b{batch} grid {side}",
                make, fused, oracle)


def cases(s: Setup, quick: bool) -> list[Case]:
    """Every tuning key: rel-pos attention windowed (one key: every mode's windows are 14 x 14) and
    global per mode, varlen for CLIP, packed SAM-global (tables up to Base / Large) and V2's causal
    flow (prefix-LM, GQA, RoPE), the four compressor convs. ``quick``: Base only for the attention, batch 1 where batches are named."""
    batch = 1 if (quick or s.reduced) else 8
    modes = ("base",) if (quick or s.reduced) else ("tiny", "small", "base", "large")
    out = [_rel_pos_case(s, "base", "windowed", batch)]
    out += [_rel_pos_case(s, m, "global", batch) for m in modes]
    out += [_varlen_case(s, "clip", batch), _varlen_case(s, "<=base", batch), _causal_flow_case(s, batch)]
    if not (quick or s.reduced):
        out.append(_varlen_case(s, "<=large", batch))
    out += [_compress_case(s, name, batch) for name in COMPRESS_STEPS]
    return out


# ---- checking and timing ---------------------------------------------------------------------


def static_rows(target: str) -> tuple[dict, str]:
    """The static report's rows for ``target`` per config name (``<entry>`` or ``<entry>#<i>``),
    from the baseline of the running Triton; ({}, why) when there is none."""
    from .static_report import versioned

    path = Path(versioned(str(STATIC_BASELINE)))
    if not path.exists():
        return {}, f"no static baseline for this Triton ({path.name}): candidates not pre-checked"
    rows: dict = {}
    for r in json.loads(path.read_text())["rows"]:
        if r["target"] == target:
            rows.setdefault((r["kernel"], r["config"]), []).append(r)
    return rows, ""


def static_problem(s: Setup, kernel: str, config_name: str) -> str:
    if not s.static_rows:
        return ""
    rows = s.static_rows.get((kernel, config_name))
    if not rows:
        return f"{config_name} is not in the static report"
    bad = [r for r in rows if r["error"] or r["spill_bytes"]]
    return f"{config_name}: static report: {bad[0]['error'] or str(bad[0]['spill_bytes']) + ' B spilled'}" if bad else ""


def timer(s: Setup, fn: Callable) -> list[float]:
    """Milliseconds per call: CUDA events on a GPU (warm-up excluded), wall clock elsewhere."""
    for _ in range(s.warmup):
        fn()
    times = []
    if s.device.type == "cuda":
        for _ in range(s.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def tune_case(s: Setup, case: Case, log=print) -> list[Result]:
    from .kernels.configs import CANDIDATES, fits, forced

    inputs = case.make()
    expected = case.oracle(*inputs)
    atol, rtol = cfg.TOLERANCES[s.dtype]
    results = []
    for i, conf in enumerate(CANDIDATES[case.kernel][case.entry]):
        name = case.entry if i == 0 else f"{case.entry}#{i}"
        r = Result(i, dict(conf))
        results.append(r)
        if not fits(conf, case.lp):
            r.skipped = f"{name} is for tables of at most {conf['MAX_LP']} rows (this shape: {case.lp})"
            log(f"    {name:<14} skipped: {r.skipped}")
            continue
        if (why := static_problem(s, case.kernel, name)):
            r.skipped = why
            log(f"    {name:<14} skipped: {why}")
            continue
        full = dict(conf)
        with forced(case.kernel, case.key, full), dispatch.backend(s.backend), torch.inference_mode():
            try:
                out = case.fused(*inputs)
                if case.op is not None and (ran := dispatch.last_backends()[case.op].backend) != s.backend:
                    raise RuntimeError(f"the {s.backend} backend did not run ({ran} did)")
                err = (out.float() - expected).abs()
                r.max_abs_err = float(err.max())
                if not torch.allclose(out.float(), expected, atol=atol, rtol=rtol):
                    r.skipped = f"wrong result: max abs error {r.max_abs_err:.3g} (atol {atol}, rtol {rtol})"
                else:
                    times = timer(s, lambda: case.fused(*inputs))
                    r.median_ms, r.repeats = statistics.median(times), len(times)
            except Exception as e:  # a candidate that fails is a finding, not the end of the run
                r.skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log(f"    {name:<14} {conf}  " + (f"{r.median_ms:.4f} ms" if r.median_ms is not None else f"NOT TIMED: {r.skipped}"))
    return results


def target_of(device: torch.device) -> str:
    if device.type != "cuda":
        return "sm_90a"   # the dry run checks the lookup against the H100's rows
    major, minor = torch.cuda.get_device_capability(device)
    return "sm_90a" if major >= 9 else "sm_80"


def run(quick: bool = False, dry_run: bool = False, dtype=torch.bfloat16, repeats: int | None = None, log=print) -> dict:
    """Tune every case; returns the table (``entries`` keyed ``<kernel>|<key>``)."""
    import triton

    from .profiler import device_name

    if dry_run:
        s = Setup(torch.device("cpu"), "triton-interpret", dtype, reduced=True, warmup=0, repeats=repeats or 1)
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("tuning needs a CUDA device (use --dry-run to rehearse on the CPU)")
        s = Setup(torch.device("cuda"), "triton", dtype, reduced=False, repeats=repeats or (10 if quick else 20))
    s.static_rows, why = static_rows(target_of(s.device))
    if why:
        log(f"note: {why}")
    entries, began = {}, time.time()
    for case in cases(s, quick):
        log(f"  {case.kernel} {case.key} ({case.label})")
        results = tune_case(s, case, log)
        timed = [r for r in results if r.median_ms is not None]
        if not timed:
            log("    no candidate passed: the launchers keep the default")
            continue
        best = min(timed, key=lambda r: r.median_ms)
        default = results[0].median_ms
        entries[f"{case.kernel}|{case.key}"] = dict(
            config=best.config, candidate=best.candidate, median_ms=best.median_ms, default_ms=default,
            speedup_vs_default=(default / best.median_ms) if default else None, shape=case.label,
            candidates=[r.__dict__ for r in results])
    name = device_name(s.device)
    return dict(device=name, dry_run=dry_run, dtype=str(dtype).removeprefix("torch."), triton=triton.__version__,
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - began, 1),
                timing="median of CUDA-event times per call, warm-up excluded" if not dry_run else
                "dry run: interpreter wall clock, not a measurement", entries=entries)


def default_path(device: str) -> Path:
    from .kernels.configs import TUNED_DIR, device_slug

    return TUNED_DIR / f"{device_slug(device)}.json"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="deepencoder-kernels tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Base-mode shapes, batch 1, fewer repeats")
    ap.add_argument("--dry-run", action="store_true", help="CPU: Triton's interpreter at reduced shapes (checks the loop, times nothing real)")
    ap.add_argument("--out", help="write the table here (default: kernels/tuned/<device>.json, read by the launchers)")
    ap.add_argument("--repeats", type=int, help="timed calls per candidate")
    args = ap.parse_args(argv)
    if args.dry_run and not args.out:
        ap.error("--dry-run needs --out (a dry run's table must not land where launchers read)")
    if args.dry_run != dispatch.triton_interpret_mode():
        # Triton fixes interpreted vs compiled when kernels are decorated: run in a process that has the right mode
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if args.dry_run:
            env["TRITON_INTERPRET"] = "1"
        return subprocess.run([sys.executable, "-m", "deepencoder_kernels", "tune", *(sys.argv[2:] if argv is None else argv)],
                              env=env).returncode
    try:
        table = run(args.quick, args.dry_run, repeats=args.repeats)
    except RuntimeError as e:
        print(f"tune: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) if args.out else default_path(table["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path} ({len(table['entries'])} tuned keys, {table['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
