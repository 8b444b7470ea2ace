"""Every benchmark in one command: results JSON per benchmark, one merged JSON, PNG plots, and the
benchmarks/RESULTS.md (and the README's headline table) regenerated.

    python benchmarks/run_all.py            # everything (the fused-path memory runs in Triton's
                                            # interpreter on a CPU machine: ~15 minutes there)
    python benchmarks/run_all.py --quick    # skip the interpreter-heavy memory measurements

On a CUDA machine the same command also runs the GPU benchmarks (pytest-benchmark for the SAM
attention, the GPU parts of the others); on a CPU machine those parts skip and say so.
Writes results/all_<device>.json and results/plot_*_<device>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("DEEPENCODER_KERNELS_RESULTS") or HERE / "results")   # see common.py
MODES = ("tiny", "small", "base", "large", "gundam")
MiB = 2**20


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=HERE, check=True)


def device_tag() -> str:
    """Result files are named by device: the GPU's name, or "cpu"."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", torch.cuda.get_device_name()).strip("_") if torch.cuda.is_available() else "cpu"


def run_benchmarks(quick: bool, modes=MODES, dry_run: bool = False) -> None:
    py = sys.executable
    tag = device_tag()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        run([py, "-m", "deepencoder_kernels", "profile", "--mode", mode, "--quiet",
             "--json", str(RESULTS / f"profile_{mode}_{tag}.json"), "--plot", str(RESULTS / f"profile_{mode}_{tag}.png")])
    if dry_run:   # a rehearsal: the steps, not the figures (tests/test_benchmarks_smoke.py runs the GPU code)
        run([py, "bench_packed.py"])
        return
    run([py, "bench_saccade_gather.py"])
    run([py, "bench_packed.py"])
    run([py, "bench_causal_flow.py"] + (["--quick"] if quick else []))   # DeepEncoder V2's attention: skips without CUDA
    if not quick:
        run([py, "bench_compress.py"])
        run([py, "bench_memory.py"])
        run([py, "bench_pages.py"])         # page reading: CPU only, a few minutes (a fresh process per case)
    if torch.cuda.is_available():
        run([py, "-m", "pytest", "-q", "bench_rel_pos_attention.py",
             f"--benchmark-json={RESULTS / ('rel_pos_attention_' + torch.cuda.get_device_name().replace(' ', '_') + '.json')}"])
    else:
        print("GPU benchmarks (bench_rel_pos_attention.py) skipped: torch has no usable CUDA device")


def merge() -> Path:
    merged = {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json")) if not path.stem.startswith("all_")}
    out = RESULTS / f"all_{device_tag()}.json"
    out.write_text(json.dumps(merged, indent=1))
    print("wrote", out)
    return out


def plots() -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag, written = device_tag(), []

    def save(fig, name):
        path = RESULTS / f"plot_{name}_{tag}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    profiles = {m: json.loads(p.read_text()) for m in MODES if (p := RESULTS / f"profile_{m}_{tag}.json").exists()}
    if profiles:  # memory and FLOPs per stage, every mode
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        stages = list(dict.fromkeys(s["name"] for p in profiles.values() for s in p["stages"]))
        width = 0.8 / len(profiles)
        for i, (mode, p) in enumerate(profiles.items()):
            by = {s["name"]: s for s in p["stages"]}
            xs = [j + i * width for j in range(len(stages))]
            axes[0].bar(xs, [by.get(s, {}).get("peak_bytes", 0) / MiB for s in stages], width, label=mode)
            axes[1].bar(xs, [by.get(s, {}).get("flops", 0) / 1e9 for s in stages], width, label=mode)
        for ax, label in zip(axes, ("peak activation MiB (reference backends)", "GFLOPs")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages, rotation=30, ha="right")
            ax.set_ylabel(label)
            ax.legend()
        save(fig, "stages")
    if (path := RESULTS / f"saccade_gather_{tag}.json").exists():
        rows = json.loads(path.read_text())["rows"]
        fig, ax = plt.subplots(figsize=(9, 4))
        labels = [f"N={r['candidates']} C={r['channels']}\nB={r['batch']}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours_us"] for r in rows], 0.4, label="C++ op")
        ax.bar([x + 0.2 for x in xs], [r["topk_gather_us"] for r in rows], 0.4, label="torch.topk + torch.gather")
        ax.set_yscale("log")
        ax.set_ylabel("us (median)")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.legend()
        ax.set_title("saccade gather")
        save(fig, "saccade")
    if (path := RESULTS / f"compress_{tag}.json").exists():
        rows = json.loads(path.read_text())["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        xs = range(len(rows))
        for ax, key, label in ((axes[0], "bytes", "MiB moved"), (axes[1], "peak", "peak activation MiB")):
            ax.bar([x - 0.2 for x in xs], [r["reference"][key] / MiB for r in rows], 0.4, label="reference chain")
            ax.bar([x + 0.2 for x in xs], [r["fused"][key] / MiB for r in rows], 0.4, label="fused kernels")
            ax.set_xticks(list(xs), [r["mode"] for r in rows])
            ax.set_ylabel(label)
            ax.legend()
        fig.suptitle("neck + compressor, bf16, batch 1")
        save(fig, "compress")
    if (path := RESULTS / f"attention_memory_{tag}.json").exists():
        rows = json.loads(path.read_text())["rows"]
        fig, ax = plt.subplots(figsize=(10, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["reference_peak_bytes"] / MiB for r in rows], 0.4, label="dense-bias reference")
        ax.bar([x + 0.2 for x in xs], [(r["fused_peak_bytes"] or 0) / MiB for r in rows], 0.4, label="fused")
        ax.set_yscale("log")
        ax.set_ylabel("peak activation MiB")
        ax.set_xticks(list(xs), [f"{r['mode']}\n{r['block']}" for r in rows], fontsize=8)
        ax.legend()
        ax.set_title("SAM rel-pos attention memory, bf16, batch 1")
        save(fig, "attention_memory")
    for path in written:
        print("wrote", path)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the interpreter-heavy memory measurements")
    ap.add_argument("--plots-only", action="store_true", help="re-plot and re-render from the existing JSON files")
    ap.add_argument("--no-render", action="store_true", help="leave benchmarks/RESULTS.md and README.md alone")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to profile (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="a quick rehearsal on the CPU: no profiles; packing counts, merge, plots")
    args = ap.parse_args()
    if not args.plots_only:
        run_benchmarks(args.quick, () if args.dry_run else args.modes, args.dry_run)
    merge()
    plots()
    if not args.no_render:
        run([sys.executable, "render_results.py"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
