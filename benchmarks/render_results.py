"""Render the results from the JSON files (nothing typed): the full tables into benchmarks/RESULTS.md,
the headline table into it and into README.md.

    python benchmarks/render_results.py                     # benchmarks/results -> RESULTS.md + README.md
    python benchmarks/render_results.py --unpack all_NVIDIA_H200.json   # a GPU run's results (from
                                                            # scripts/gpu_check.sh) into benchmarks/results, then render

--results DIR (repeatable; a later folder's file of the same name wins), --results-md, --readme and
--no-readme render elsewhere (scripts/gpu_check.sh renders a GPU machine's RESULTS.md into its output
folder after every step). The blocks between <!-- headline:start/end --> and <!-- results:start/end -->
are rewritten; everything else in both files is written by hand.

A GPU benchmark's file (benchmarks/common.py write_result): {device, date, rows: [{impl, ms, ...}]},
this package's impl named "... (this package)" (or starting "fused"); headline_rows() picks the rows
of each comparison (end_to_end*: model "v1" / "v2"; causal_flow_*; packed_*; compress_timing_*).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("DEEPENCODER_KERNELS_RESULTS") or ROOT / "benchmarks" / "results")
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"
MiB = 2**20
NOT_YET = "not measured on a GPU yet"
_found: dict[str, Path] = {}     # file name -> path, over every --results folder (set by render())


def found(pattern: str) -> list[Path]:
    """The result files whose name matches ``pattern`` (fnmatch), sorted by name."""
    return [_found[name] for name in sorted(_found) if fnmatch.fnmatch(name, pattern)]


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


def cpu_vs_upstream_section(path: Path) -> list[str]:
    """benchmarks/bench_cpu.py: the package and accelerate()d upstream vs upstream on a CPU, per view and
    stage, and the counted peaks of one block / attention call."""
    m = json.loads(path.read_text())
    out = [f"**CPU: this package vs upstream's code** ({m['device']}, {m['clock']}, {m['date']}, "
           f"torch {m['torch']}; same weights, rounds interleaved, x = upstream's time / the variant's, median over rounds; "
           f"attention computed in {', '.join(f'{k} -> {v}' for k, v in m['attention_compute_dtype'].items())}): "
           f"`cd benchmarks && {m['command']}`", ""]
    timed = [r for r in m["rows"] if "speedup" in r]
    rows = [[r["case"], r["rounds"], f"{r['seconds']['upstream']:.2f}", f"{r['seconds']['package']:.2f}",
             f"**{r['speedup']['package']:.2f}x**", f"{r['seconds']['accelerated']:.2f}", f"**{r['speedup']['accelerated']:.2f}x**",
             f"{min(r['load_average']):.1f}..{max(r['load_average']):.1f}"] for r in timed]
    out += table("case|rounds>|upstream s>|package s>|package x>|accelerated s>|accelerated x>|host load (1 min)>", rows)
    for r in timed:
        if "stage_seconds" in r:
            out += ["", f"Stages of `{r['case']}` (s; x vs upstream):", ""]
            st, sp = r["stage_seconds"], r["stage_speedup"]
            out += table("stage|upstream s>|package s>|package x>|accelerated s>|accelerated x>",
                         [[name, f"{st['upstream'][name]:.3f}", f"{st['package'][name]:.3f}", f"{sp['package'].get(name, 0):.2f}x",
                           f"{st['accelerated'][name]:.3f}", f"{sp['accelerated'].get(name, 0):.2f}x"] for name in st["upstream"]])
    ops = [r for r in m["rows"] if "speedup_vs_reference" in r]
    if ops:
        out += ["", "The packed varlen op as the encoders call it: upstream's computation (the `reference` backend: a dense "
                "bias / mask per sequence, padded chunks) vs this CPU's auto backend:", ""]
        out += table("case|backend|reference ms>|backend ms>|x>",
                     [[r["case"], r["backend"], f"{r['seconds']['reference'] * 1e3:.1f}", f"{r['seconds'][r['backend']] * 1e3:.1f}",
                       f"**{r['speedup_vs_reference']:.2f}x**"] for r in ops])
    peaks = [r for r in m["rows"] if "peak_bytes" in r]
    if peaks:
        out += ["", "Peak activation bytes of one call (counted on fake tensors, `MemoryTracker`; batch 1):", ""]
        out += table("case|upstream MiB>|package MiB>|accelerated MiB>|upstream / package>",
                     [[r["case"].removesuffix("/peak bytes"), *(f"{r['peak_bytes'][v] / MiB:.0f}" for v in ("upstream", "package", "accelerated")),
                       f"{r['peak_bytes']['upstream'] / r['peak_bytes']['package']:.1f}x"] for r in peaks])
    return out


def cpu_headline_rows() -> list[list[str]]:
    """Headline rows of bench_cpu.py's results (one file per thread count): a Base view in fp32, a
    global + windowed SAM block in bf16, the global attention's counted peak (its bias block grows
    with the threads)."""
    rows = []
    for path in found("cpu_vs_upstream_*.json"):
        m = json.loads(path.read_text())
        on = f"{m['device']}, {m['clock']}, {m['date']}"
        by = {r["case"]: r for r in m["rows"]}
        view = by.get("base/float32/view")
        if view:
            rows.append(["DeepEncoder v1 on a CPU, one Base view, fp32 (same weights)",
                         f"{view['seconds']['package']:.1f} s ({view['speedup']['package']:.2f}x); accelerate()d upstream "
                         f"{view['seconds']['accelerated']:.1f} s ({view['speedup']['accelerated']:.2f}x)",
                         f"upstream's code: {view['seconds']['upstream']:.1f} s", on])
        blocks = [by.get(f"base/bfloat16/{kind} block") for kind in ("global", "windowed")]
        if all(blocks):
            rows.append(["CPU, one SAM global / windowed block at Base, bf16",
                         " / ".join(f"{b['seconds']['package']:.2f} s ({b['speedup']['package']:.2f}x)" for b in blocks),
                         "upstream's code: " + " / ".join(f"{b['seconds']['upstream']:.2f} s" for b in blocks), on])
        peak = by.get("base/float32/global attention/peak bytes")
        if peak:
            b = peak["peak_bytes"]
            rows.append([f"CPU, SAM global attention at Base (qkv, attention, proj): activation peak, fp32, {m['threads']} thread(s)",
                         f"{b['package'] / MiB:.0f} MiB", f"upstream's dense bias: {b['upstream'] / MiB:.0f} MiB "
                         f"({b['upstream'] / b['package']:.1f}x)", f"counted, {m['date']}"])
    return rows


# ---- the headline table (README and RESULTS.md) ------------------------------------------------------


def _ms(v: float) -> str:
    return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def _times(rows: list[dict], ours: str, others: list[str] | None = None) -> tuple[str, str] | None:
    """(this package's time, "baseline time (ratio)" for each other impl) from rows with impl + ms."""
    by = {r["impl"]: r["ms"] for r in rows if r.get("ms") is not None}
    if ours not in by:
        return None
    others = [k for k in (others or by) if k in by and k != ours]
    cells = [f"{k}: {_ms(by[k])} ({by[k] / by[ours]:.2f}x)" for k in others]
    return _ms(by[ours]), "; ".join(cells)


def _rows_file(pattern: str, keep=lambda r: True) -> list[tuple[dict, list[dict]]]:
    out = []
    for path in found(pattern):
        m = json.loads(path.read_text())
        rows = [r for r in m.get("rows") or [] if keep(r)]
        if rows:
            out.append((m, rows))
    return out


def _ours(rows: list[dict]) -> str | None:
    """This package's impl name in a rows file (the benchmarks call it "... (this package)" or "fused")."""
    return next((r["impl"] for r in rows if "this package" in str(r.get("impl")) or str(r.get("impl")).startswith("fused")), None)


def _sam_attention(block: str, batch: int) -> list[tuple[str, str, str]]:
    out = []
    for path in found("rel_pos_attention_*.json"):
        if "training" in path.name:
            continue
        m = json.loads(path.read_text())
        cases = [b for b in m.get("benchmarks") or [] if b.get("params", {}).get("mode") == "base"
                 and b["params"].get("block") == block and b["params"].get("batch") == batch]
        names = {"fused": "this package", "dense_sdpa": "dense-bias SDPA (upstream)", "flex": "FlexAttention"}
        rows = [dict(impl=names.get(b["params"].get("impl"), b["params"].get("impl")), ms=b["stats"]["median"] * 1e3) for b in cases]
        cells = _times(rows, "this package")
        if cells:
            device = next((b["extra_info"].get("device") for b in cases if b.get("extra_info", {}).get("device")), "?")
            out.append((*cells, f"{device}, {m.get('datetime', '?')[:10]}"))
    return out


def headline_rows() -> list[list[str]]:
    """One row per headline comparison: GPU times ("not measured on a GPU yet" until a GPU run's
    file is in the results), then what is counted or measured on any machine."""
    rows = []

    def gpu(what: str, baselines: str, measured: list[tuple[str, str, str]]):
        if measured:
            rows.extend([what, *cells] for cells in measured)
        else:
            rows.append([what, NOT_YET, baselines, ""])

    def from_rows(pattern, keep=lambda r: True, ours=None, others=None):
        out = []
        for m, rs in _rows_file(pattern, keep):
            cells = _times(rs, ours or _ours(rs) or "", others)
            if cells is None:   # measured, but no row says which is this package's: show them all rather than "not measured"
                cells = ("? (no impl named '... (this package)')", "; ".join(f"{r['impl']}: {_ms(r['ms'])}" for r in rs if "ms" in r))
            out.append((*cells, f"{m.get('device', '?')}, {m.get('date', '?')}"))
        return out

    gpu("DeepEncoder v1, one Base view, end to end (bf16)", "upstream's computation (the reference backend)",
        from_rows("end_to_end*.json", lambda r: r.get("model") == "v1" and r.get("mode") == "base"))
    gpu("DeepEncoder V2, one page (dynamic tiles), end to end (bf16)", "upstream's computation (the reference backend)",
        from_rows("end_to_end*.json", lambda r: r.get("model") == "v2"))
    gpu("SAM attention, Base, global block, batch 1", "dense-bias SDPA (upstream); FlexAttention", _sam_attention("global", 1))
    gpu("SAM attention, Base, windowed blocks, batch 1", "dense-bias SDPA (upstream)", _sam_attention("windowed", 1))
    gpu("CLIP attention, varlen over the mixed batch's 42 sequences", "padded SDPA + key mask; nested-tensor SDPA; flash-attn varlen",
        from_rows("packed_*.json", lambda r: r.get("kind", "").startswith("CLIP attention"), "varlen (this package)"))
    gpu("V2 causal-flow attention", "dense-mask SDPA; FlexAttention; two-call flash", from_rows("causal_flow_*.json"))
    gpu("Neck + compressor, Base, batch 1", "PyTorch's cuDNN convs (NCHW, channels-last); torch.compile",
        from_rows("compress_timing_*.json", lambda r: r.get("mode") == "base" and r.get("batch") == 1 and not r["impl"].startswith("fwd+bwd"),
                  "fused (this package)"))
    gpu("Mixed batch of 42 views (Tiny..Gundam), packed vs one image at a time", "the per-image loop",
        from_rows("packed_*.json", lambda r: r.get("kind", "").startswith("encoder"), "packed batch"))
    on = lambda m: f"{m['device']}, {m['date']}"  # noqa: E731
    for pattern, what, key in (("attention_memory_*.json", "activation peak", "peak"),
                               ("attention_training_memory_*.json", "saved for backward", "saved")):
        for path in found(pattern):
            m = json.loads(path.read_text())
            for r in m["rows"]:
                if r["mode"] == "base" and r["block"] == "global":
                    fused, ref = r[f"fused_{key}_bytes"], r[f"reference_{key}_bytes"]
                    rows.append([f"SAM global attention at Base: {what} (bf16, batch 1)", f"{fused / MiB:.1f} MiB",
                                 f"dense-bias reference: {ref / MiB:.1f} MiB ({ref / fused:.0f}x)", on(m)])
    for path in found("compress_c*.json"):
        m = json.loads(path.read_text())
        for r in m["rows"]:
            if r["mode"] == "base":
                ref, fused = r["reference"], r["fused"]
                rows.append(["Neck + compressor at Base: bytes moved (bf16, batch 1)", f"{fused['bytes'] / MiB:.1f} MiB in {fused['passes']} passes",
                             f"reference chain: {ref['bytes'] / MiB:.1f} MiB in {ref['passes']} passes ({ref['bytes'] / fused['bytes']:.2f}x)", on(m)])
    for path in found("packing.json"):
        m = json.loads(path.read_text())
        for r in m["rows"]:
            if r["stage"].startswith("SAM global"):
                rows.append([f"Mixed batch, SAM global attention: score bytes a dense attention would hold ({r['sequences']} views)",
                             f"{r['packed_score_bytes'] / 2**30:.1f} GiB packed", f"padded to the longest: {r['padded_score_bytes'] / 2**30:.1f} GiB "
                             f"({r['padded_score_bytes'] / r['packed_score_bytes']:.1f}x)", f"counted from shapes, {m['date']}"])
    rows += cpu_headline_rows()
    for path in found("saccade_gather_*.json"):
        m = json.loads(path.read_text())
        for r in m["rows"]:
            if (r["candidates"], r["channels"], r["batch"]) == (4096, 768, 1):
                rows.append([f"Saccade gather (N 4096, C 768, k {r['k']}, batch 1), {r.get('device', 'cpu')}", f"{r['ours_us']:.0f} us (C++ op)",
                             f"torch.topk + torch.gather: {r['topk_gather_us']:.0f} us ({r['speedup_one_k']:.2f}x)", on(m)])
    return rows


def headline() -> list[str]:
    out = ["| result | this package | compared with (x: their time or size / ours) | measured on |", "|---|---|---|---|"]
    return out + ["| " + " | ".join(row) + " |" for row in headline_rows()]


# ---- every result -----------------------------------------------------------------------------------


def full_results() -> list[str]:
    parts: list[str] = []
    by_device: dict[str, list[Path]] = {}   # profile_<mode>_<device>.json
    for path in found("profile_*.json"):
        by_device.setdefault(path.stem.split("_", 2)[-1], []).append(path)
    for profiles in by_device.values():
        for path in profiles:
            if json.loads(path.read_text())["mode"] == "base":
                parts += profile_section(path) + [""]
        if len(profiles) > 1:
            parts += modes_section(profiles) + [""]
    for path in found("attention_memory_*.json"):
        parts += memory_section(path) + [""]
    for path in found("attention_training_memory_*.json"):
        parts += training_memory_section(path) + [""]
    for path in found("compress_c*.json"):
        parts += compress_section(path) + [""]
    for path in found("packing.json"):
        parts += packing_section(path) + [""]
    for path in found("saccade_gather_*.json"):
        parts += saccade_section(path) + [""]
    for path in found("cpu_vs_upstream_*.json"):
        parts += cpu_vs_upstream_section(path) + [""]
    gpu = [("end_to_end_*.json", "End to end on the GPU", "cd benchmarks && python bench_end_to_end.py"),
           ("packed_*.json", "Packed attention and encoder on the GPU", "cd benchmarks && python bench_packed.py"),
           ("causal_flow_*.json", "V2 causal-flow attention on the GPU", "cd benchmarks && python bench_causal_flow.py"),
           ("compress_timing_*.json", "Neck + compressor on the GPU", "cd benchmarks && python bench_compress.py")]
    for pattern, title, command in gpu:
        for path in found(pattern):
            parts += rows_section(path, title, command) + [""]
    for path in found("rel_pos_attention_*.json"):
        parts += pytest_benchmark_section(path) + [""]
    for path in found("tuned_*.json"):
        parts += tuned_section(path) + [""]
    baselines = sorted((ROOT / "benchmarks" / "baselines").glob("static_report_triton-*.json"),
                       key=lambda p: tuple(int(x) for x in p.stem.rsplit("-", 1)[1].split(".")))
    parts += static_section(baselines[-1])   # the newest Triton's (each version's baseline is in the folder)
    return parts


def replace_block(text: str, name: str, lines: list[str], path: Path) -> str:
    """Rewrite what lies between <!-- NAME:start ... --> and <!-- NAME:end --> in ``text``."""
    pattern = rf"<!-- {name}:start.*?<!-- {name}:end -->"
    if not re.search(pattern, text, flags=re.S):
        raise SystemExit(f"render_results: {path} has no <!-- {name}:start --> ... <!-- {name}:end --> block to rewrite")
    block = f"<!-- {name}:start (generated by benchmarks/render_results.py) -->\n" + "\n".join(lines) + f"\n<!-- {name}:end -->"
    return re.sub(pattern, lambda _: block, text, flags=re.S)


def unpack(all_json: Path, folder: Path) -> list[Path]:
    """scripts/gpu_check.sh's all_<device>.json (result name -> its JSON) back into one file per result."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, content in json.loads(all_json.read_text()).items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", stem):
            raise SystemExit(f"render_results: {all_json}: {stem!r} is not a result file name")
        path = folder / f"{stem}.json"
        path.write_text(json.dumps(content, indent=1))
        written.append(path)
    return written


def render(results: list[Path], results_md: Path = RESULTS_MD, readme: Path | None = README) -> None:
    _found.clear()
    for folder in results:                      # a later folder's file of the same name wins
        _found.update({p.name: p for p in sorted(Path(folder).glob("*.json")) if not p.name.startswith("all_")})
    top = headline()
    template = results_md if results_md.exists() else RESULTS_MD
    text = replace_block(template.read_text(), "headline", top, template)
    results_md.write_text(replace_block(text, "results", full_results(), template))
    print(f"updated {results_md}")
    if readme is not None:
        readme.write_text(replace_block(readme.read_text(), "headline", top, readme))
        print(f"updated {readme}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", action="append", type=Path, metavar="DIR",
                    help=f"result folder; repeat for more, a later one wins (default: {RESULTS.relative_to(ROOT) if RESULTS.is_relative_to(ROOT) else RESULTS})")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD, metavar="PATH", help="the results page to write (default: benchmarks/RESULTS.md)")
    ap.add_argument("--readme", type=Path, default=README, metavar="PATH", help="the README whose headline table to rewrite")
    ap.add_argument("--no-readme", action="store_true", help="leave the README alone")
    ap.add_argument("--unpack", type=Path, metavar="ALL_JSON", help="first write each result in a gpu_check all_<device>.json "
                    "into the (first) results folder")
    args = ap.parse_args(argv)
    results = args.results or [RESULTS]
    if args.unpack:
        for path in unpack(args.unpack, results[0]):
            print(f"wrote {path}")
    render(results, args.results_md, None if args.no_readme else args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
