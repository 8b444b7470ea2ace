"""Regenerate README's results section from the JSON files in benchmarks/results (nothing typed).

    python benchmarks/render_results.py

DEEPENCODER_KERNELS_RESULTS / DEEPENCODER_KERNELS_README: read results from / write into other
places (scripts/gpu_check.sh renders a GPU machine's results into a copy of the README).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("DEEPENCODER_KERNELS_RESULTS") or ROOT / "benchmarks" / "results")
README = Path(os.environ.get("DEEPENCODER_KERNELS_README") or ROOT / "README.md")
MiB = 2**20


def table(columns: str, rows: list[list]) -> list[str]:
    """A markdown table; ``columns`` is "name|name>|..." where a trailing ">" right-aligns."""
    names = columns.split("|")
    out = ["| " + " | ".join(n.rstrip(">") for n in names) + " |",
           "|" + "|".join("---:" if n.endswith(">") else "---" for n in names) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def profile_section(path: Path) -> list[str]:
    p = json.loads(path.read_text())
    out = [f"**Profile, mode `{p['mode']}`** ({p['dtype']}, {p['device_name']}, backend `{p['backend']}`, "
           f"weights: {p['weights']}, {p['date']}, torch {p['versions']['torch']}): "
           f"`deepencoder-kernels profile --mode {p['mode']} --json benchmarks/results/{path.name}`", ""]
    out += timing_note(p)
    span = lambda lo, hi: f"{lo:.2f}..{hi:.2f}"  # noqa: E731
    rows = [[s["name"], s["calls"], s["tokens_in"], s["tokens_out"], f"{s['flops'] / 1e9:.1f}", f"{s['peak_bytes'] / MiB:.1f}",
             f"{s['allocated_bytes'] / MiB:.1f}", f"{s['largest_tensor_bytes'] / MiB:.1f}", f"{s['seconds']:.2f}",
             span(s.get("seconds_min", s["seconds"]), s.get("seconds_max", s["seconds"]))] for s in p["stages"]]
    rows.append(["**SAM trunk**", "", "", "", f"**{p['sam_trunk_flops'] / 1e9:.1f}**", "", "", "", "", ""])
    passes = p.get("pass_seconds") or [sum(s["seconds"] for s in p["stages"])]
    rows.append(["**total**", "", "", "", f"**{p['total_flops'] / 1e9:.1f}**", f"**{p['peak_bytes'] / MiB:.1f}**", "", "",
                 f"{p.get('seconds', passes[0]):.2f}", span(min(passes), max(passes))])
    out += table("stage|calls>|tokens in>|tokens out>|GFLOPs>|peak MiB>|allocated MiB>|largest tensor MiB>|time s>|min..max s>", rows)
    out += ["", "**Claims in circulation vs this measurement:**", ""]
    out += table("claim|claimed>|measured>|verdict",
                 [[c["claim"], f"{c['claimed']:g}", f"{c['measured']:.4g}", c["verdict"]] for c in p["claims"]])
    return out


def timing_note(p: dict) -> list[str]:
    """What the profile's numbers are: counted FLOPs/bytes vs warm times (and their dtype)."""
    if "pass_seconds" not in p:
        return []
    text = (f"FLOPs and bytes: counted in {p['dtype']} on fake tensors (exact, no compute). Times: "
            f"{p['timing_dtype']}, median (min..max) of {p['repeat']} warm pass(es) after {p['warmup']} warm-up "
            f"pass(es) ({p['first_pass_seconds']:.1f} s, not included); {p['views_per_second']:.2f} views/s.")
    if p.get("timing_note"):
        text += f" Note: {p['timing_note']}."
    if p.get("cpus"):
        text += f" Host load during the timing: 1-minute load average {p['load_average']:.1f} on {p['cpus']} CPUs (shared machine)."
    return [text, ""]


def modes_section(paths: list[Path]) -> list[str]:
    profiles = [json.loads(p.read_text()) for p in paths]
    order = {m: i for i, m in enumerate(("tiny", "small", "base", "large", "gundam"))}
    profiles.sort(key=lambda p: order.get(p["mode"], 99))
    out = [f"**Every mode** ({profiles[0]['dtype']}, {profiles[0]['device_name']}, backend `{profiles[0]['backend']}`, "
           f"{profiles[0]['date']}): `deepencoder-kernels profile --mode <mode>` (all of them: `python benchmarks/run_all.py`)", ""]
    rows = [[p["mode"], p["views"], p["output_tokens"], f"{p['sam_trunk_flops'] / 1e9:.1f}", f"{p['total_flops'] / 1e9:.1f}",
             f"{p['peak_bytes'] / MiB:.0f}", f"{p.get('seconds', sum(s['seconds'] for s in p['stages'])):.1f}",
             p.get("timing_dtype", p["dtype"]), f"{p.get('views_per_second', 0):.2f}", f"{p.get('load_average', 0):.1f}"]
            for p in profiles]
    return out + table("mode|views>|tokens>|SAM trunk GFLOPs>|total GFLOPs>|peak activation MiB>|warm pass s>|timed in|views/s>|"
                       "host load (1 min)>", rows)


def memory_section(path: Path) -> list[str]:
    m = json.loads(path.read_text())
    out = [f"**SAM attention activation memory** (bf16, batch 1, {m['device']}, {m['date']}): "
           f"`cd benchmarks && python bench_memory.py`. Reference: upstream's dense-bias path under "
           "`MemoryTracker`. Fused: what its launcher allocates (on a CPU machine with the Triton launch "
           "stubbed, `profiler.stubbed_launches`; a test shows this equals a real interpreted run byte for byte).", ""]
    rows = [[r["mode"], r["block"], f"{r['reference_peak_bytes'] / MiB:.1f}", f"{r['reference_total_bytes'] / MiB:.1f}",
             f"{r['fused_peak_bytes'] / MiB:.1f}",
             f"{r['output_bytes'] / MiB:.1f}"] for r in m["rows"]]
    return out + table("mode|block|reference peak MiB>|reference allocated MiB>|fused peak MiB>|output MiB>", rows)


def training_memory_section(path: Path) -> list[str]:
    m = json.loads(path.read_text())
    out = [f"**SAM attention, training step** (bf16, batch 1, {m['device']}, {m['date']}): `cd benchmarks && python "
           "bench_memory.py`. Saved for backward: the unique storages autograd keeps from the forward "
           "(`saved_tensors_hooks`), the op's inputs (qkv, tables, pad_kv) not counted; reference = upstream's "
           "dense-bias path through torch's CPU SDPA; fused = output + fp32 row logsumexp. Fused backward peak: "
           "what the backward launcher allocates (dqkv, row deltas, table/pad_kv partials, bounded by shapes), "
           "launches stubbed as above.", ""]
    rows = [[r["mode"], r["block"], f"{r['reference_saved_bytes'] / MiB:.1f}", f"{r['fused_saved_bytes'] / MiB:.1f}",
             f"{r['reference_saved_bytes'] / r['fused_saved_bytes']:.0f}x", f"{r['fused_backward_peak_bytes'] / MiB:.1f}",
             f"{r['dqkv_bytes'] / MiB:.1f}"] for r in m["rows"]]
    return out + table("mode|block|reference saved MiB>|fused saved MiB>|less>|fused backward peak MiB>|dqkv MiB>", rows)


def saccade_section(path: Path) -> list[str]:
    m = json.loads(path.read_text())
    out = [f"**Saccade gather, C++ op vs torch** (scores fp32, features bf16, {m['device']}, {m['date']}, "
           f"torch {m['torch']}; medians, side by side in one run): `cd benchmarks && python bench_saccade_gather.py`", ""]
    rows = [[r["candidates"], r["channels"], r["k"], r["batch"], f"{r['ours_us']:.0f}", f"{r['topk_gather_us']:.0f}",
             f"**{r['speedup_one_k']:.2f}x**", f"{r['ours_mixed_k_us']:.0f}", f"{r['per_image_loop_us']:.0f}",
             f"**{r['speedup_mixed_k']:.2f}x**"] for r in m["rows"]]
    return out + table("N|C>|k>|batch>|op us>|topk+gather us>|speed-up>|op, per-image k us>|per-image topk loop us>|speed-up>", rows)


def packing_section(path: Path) -> list[str]:
    m = json.loads(path.read_text())
    out = [f"**Packing a mixed batch** (8 Tiny + 8 Small + 8 Base + 4 Large + 2 Gundam 3x2 pages = 42 views; "
           f"counted from the preprocessed views' shapes, {m['date']}): `cd benchmarks && python bench_packed.py`. "
           "Padded = every sequence padded to the batch's longest, as one padded SDPA call runs it; "
           "score bytes = the bf16 score matrices a dense (mask-materialising) attention would hold.", ""]
    rows = [[r["stage"], r["sequences"], r["packed_tokens"], r["padded_tokens"],
             f"{r['packed_hidden_bytes'] / MiB:.1f}", f"{r['padded_hidden_bytes'] / MiB:.1f}",
             f"{r['packed_score_bytes'] / MiB:.0f}", f"{r['padded_score_bytes'] / MiB:.0f}",
             f"{r['packed_attention_flops'] / 1e9:.0f}", f"{r['padded_attention_flops'] / 1e9:.0f}"] for r in m["rows"]]
    return out + table("stage (per block / layer)|sequences>|packed tokens>|padded tokens>|packed hidden MiB>|"
                       "padded hidden MiB>|packed score MiB>|padded score MiB>|packed attn GFLOPs>|padded attn GFLOPs>", rows)


def compress_section(path: Path) -> list[str]:
    m = json.loads(path.read_text())
    out = [f"**Neck + compressor, reference chain vs fused kernels** (bf16, batch 1, {m['device']}, {m['date']}): "
           "`cd benchmarks && python bench_compress.py`. Passes and bytes: each reference aten op (each fused "
           "launch) reading its inputs and writing its outputs once; peak / allocated: activation bytes measured "
           "by `MemoryTracker` (the fused launcher ran in Triton's interpreter, which allocates nothing of its own).", ""]
    rows = []
    for r in m["rows"]:
        ref, fused = r["reference"], r["fused"]
        rows.append([r["mode"], f"{r['flops'] / 1e9:.2f}", ref["passes"], fused["passes"], f"{ref['bytes'] / MiB:.1f}",
                     f"{fused['bytes'] / MiB:.1f}", f"{ref['bytes'] / fused['bytes']:.2f}x", f"{ref['peak'] / MiB:.1f}",
                     f"{fused['peak'] / MiB:.1f}", f"{ref['allocated'] / MiB:.1f}", f"{fused['allocated'] / MiB:.1f}"])
    out = out + table("mode|GFLOPs>|reference passes>|fused passes>|reference MiB moved>|fused MiB moved>|fewer bytes>|"
                      "reference peak MiB>|fused peak MiB>|reference allocated MiB>|fused allocated MiB>", rows)
    trained = [r for r in m["rows"] if "training" in r]
    if not trained:
        return out
    stubbed = trained[0]["training"].get("fused_launches") == "stubbed"
    out += ["", "**Neck + compressor training step** (forward + backward, gradients of x and every parameter; bf16, "
            f"batch 1, {m['device']}, {m['date']}; same command). Saved = what is kept for the backward (live after "
            "the forward, less the output): the reference through autograd, the fused path its pre-norm conv outputs, "
            "fp32 mean/rstd per pixel and net_2's output. Peak / allocated: the whole step, `MemoryTracker`"
            + (", the fused launchers with the Triton launch stubbed (`profiler.stubbed_launches`)." if stubbed else "."), ""]
    rows = []
    for r in trained:
        ref, fused = r["training"]["reference"], r["training"]["fused"]
        rows.append([r["mode"], f"{ref['saved'] / MiB:.1f}", f"{fused['saved'] / MiB:.1f}", f"{ref['saved'] / fused['saved']:.1f}x",
                     f"{ref['peak'] / MiB:.1f}", f"{fused['peak'] / MiB:.1f}", f"{ref['allocated'] / MiB:.1f}",
                     f"{fused['allocated'] / MiB:.1f}"])
    return out + table("mode|reference saved MiB>|fused saved MiB>|less saved>|reference peak MiB>|fused peak MiB>|"
                       "reference allocated MiB>|fused allocated MiB>", rows)


def rows_section(path: Path, title: str, command: str) -> list[str]:
    """Any result file with a ``rows`` list (the GPU timings): every scalar field a column, as measured."""
    m = json.loads(path.read_text())
    rows = m.get("rows") or []
    if not rows:
        return []
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if all(not isinstance(r.get(k), (dict, list)) for r in rows)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    out = [f"**{title}** ({m.get('device', '?')}, {m.get('date', '?')}, torch {m.get('torch', '?')}): `{command}`", ""]
    return out + table("|".join(columns), [[fmt(r.get(c)) for c in columns] for r in rows])


def pytest_benchmark_section(path: Path) -> list[str]:
    """pytest-benchmark's JSON (bench_rel_pos_attention.py): median per case and its extra_info."""
    m = json.loads(path.read_text())
    benches = m.get("benchmarks") or []
    if not benches:
        return []
    extra = [k for k in dict.fromkeys(k for b in benches for k in b.get("extra_info", {})) if k != "device"]
    device = next((b["extra_info"].get("device") for b in benches if b.get("extra_info", {}).get("device")), "?")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    out = [f"**SAM rel-pos attention on the GPU** ({device}, {m.get('datetime', '?')[:10]}; median of 20 rounds): "
           f"`pytest benchmarks/bench_rel_pos_attention.py`", ""]
    rows = [[b["name"].removeprefix("test_rel_pos_attention"), f"{b['stats']['median'] * 1e3:.4f}"]
            + [fmt(b.get("extra_info", {}).get(k)) for k in extra] for b in benches]
    return out + table("case|median ms>|" + "|".join(f"{k}>" for k in extra), rows)


def tuned_section(path: Path) -> list[str]:
    t = json.loads(path.read_text())
    out = [f"**Tuned launch configs** ({t['device']}, Triton {t['triton']}, {t['date']}; {t['timing']}): "
           f"`deepencoder-kernels tune` -> `{path.name}`", ""]
    rows = [[key, e["shape"], " ".join(f"{k}={v}" for k, v in e["config"].items()), f"{e['median_ms']:.4f}",
             "" if e["default_ms"] is None else f"{e['default_ms']:.4f}",
             "" if e["speedup_vs_default"] is None else f"{e['speedup_vs_default']:.2f}x"] for key, e in t["entries"].items()]
    return out + table("kernel, key|shape|winner|median ms>|default ms>|vs default>", rows)


def static_section(path: Path) -> list[str]:
    s = json.loads(path.read_text())
    out = [f"**Static kernel report** (AOT, Triton {s['triton']}, no GPU needed): "
           f"`deepencoder-kernels static-report --check benchmarks/baselines/static_report.json` (baseline `{path.name}`)", ""]
    # fp16 rows are identical in every figure; the JSON holds both
    rows = [[r[k] for k in ("kernel", "case", "config", "target", "dtype", "registers", "spill_bytes", "shared_bytes",
                            "tensor_core_instructions")] for r in s["rows"] if r["dtype"] == "bf16"]
    return out + table("kernel|case|config|target|dtype|registers>|spill B>|shared B>|tensor-core instr>", rows)


def main() -> None:
    parts: list[str] = []
    by_device: dict[str, list[Path]] = {}   # profile_<mode>_<device>.json
    for path in sorted(RESULTS.glob("profile_*.json")):
        by_device.setdefault(path.stem.split("_", 2)[-1], []).append(path)
    for profiles in by_device.values():
        for path in profiles:
            if json.loads(path.read_text())["mode"] == "base":
                parts += profile_section(path) + [""]
        if len(profiles) > 1:
            parts += modes_section(profiles) + [""]
    for path in sorted(RESULTS.glob("attention_memory_*.json")):
        parts += memory_section(path) + [""]
    for path in sorted(RESULTS.glob("attention_training_memory_*.json")):
        parts += training_memory_section(path) + [""]
    for path in sorted(RESULTS.glob("compress_c*.json")):
        parts += compress_section(path) + [""]
    if (RESULTS / "packing.json").exists():
        parts += packing_section(RESULTS / "packing.json") + [""]
    for path in sorted(RESULTS.glob("saccade_gather_*.json")):
        parts += saccade_section(path) + [""]
    gpu = [(RESULTS.glob("packed_*.json"), "Packed attention and encoder on the GPU", "cd benchmarks && python bench_packed.py"),
           (RESULTS.glob("compress_timing_*.json"), "Neck + compressor on the GPU", "cd benchmarks && python bench_compress.py")]
    for paths, title, command in gpu:
        for path in sorted(paths):
            parts += rows_section(path, title, command) + [""]
    for path in sorted(RESULTS.glob("rel_pos_attention_*.json")):
        parts += pytest_benchmark_section(path) + [""]
    for path in sorted(RESULTS.glob("tuned_*.json")):
        parts += tuned_section(path) + [""]
    baselines = sorted((ROOT / "benchmarks" / "baselines").glob("static_report_triton-*.json"),
                       key=lambda p: tuple(int(x) for x in p.stem.rsplit("-", 1)[1].split(".")))
    parts += static_section(baselines[-1])   # the newest Triton's (each version's baseline is in the folder)
    readme = README
    text = readme.read_text()
    block = "<!-- results:start (generated by benchmarks/render_results.py) -->\n" + "\n".join(parts) + "\n<!-- results:end -->"
    text = re.sub(r"<!-- results:start.*?<!-- results:end -->", lambda _: block, text, flags=re.S)
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
