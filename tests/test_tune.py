"""The tuner and the tuned-config lookup: every candidate is in each Triton version's static
baseline (compiled clean), a tuned winner reaches the launchers only on its device and only while
it is still a candidate, and the check-then-time loop runs (interpreter, reduced shapes) and
refuses wrong or unvetted configs. scripts/gpu_check.sh: exit 2 without a GPU (its --dry-run is
a CI step: .ci/run)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from deepencoder_kernels import static_report as sr
from deepencoder_kernels import tune
from deepencoder_kernels.kernels import configs

ROOT = Path(__file__).resolve().parents[1]
BASELINES = sorted((ROOT / "benchmarks" / "baselines").glob("static_report_triton-*.json"))


def test_a_baseline_per_triton_version():
    assert {p.name for p in BASELINES} >= {"static_report_triton-3.6.json", "static_report_triton-3.9.json"}
    for path in BASELINES:
        assert json.loads(path.read_text())["triton"].startswith(path.stem.rsplit("-", 1)[1] + ".")
    assert sr.versioned("b/static_report.json", "3.6") == "b/static_report_triton-3.6.json"
    assert sr.versioned("b/static_report_triton-3.9.json", "3.6") == "b/static_report_triton-3.6.json"


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.stem)
def test_every_candidate_compiles_clean_in_the_static_report(path):
    rows = json.loads(path.read_text())["rows"]
    for kernel, entries in configs.CANDIDATES.items():
        for entry, candidates in entries.items():
            for i in range(len(candidates)):
                name = entry if i == 0 else f"{entry}#{i}"
                found = [r for r in rows if r["kernel"] == kernel and r["config"] == name]
                assert {r["target"] for r in found} == set(sr.TARGETS), f"{kernel} {name} missing from {path.name}"
                bad = [r for r in found if r["error"] or r["spill_bytes"] or r["shared_bytes"] > sr.SHARED_LIMIT[r["target"]]]
                assert not bad, bad


def test_shipped_defaults_are_the_first_candidates():
    assert configs.CANDIDATES["rel_pos_attention"]["global"][0] == configs.REL_POS_ATTENTION["global"]
    assert configs.CANDIDATES["varlen_attention"]["plain"][0] == configs.VARLEN_ATTENTION["plain"]
    for name, conf in configs.COMPRESS.items():
        assert configs.CANDIDATES["compress"][name][0] == conf
    for entries in configs.CANDIDATES.values():
        for candidates in entries.values():
            assert len({json.dumps(c, sort_keys=True) for c in candidates}) == len(candidates), "duplicate candidate"


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A tuned table for a device named "Fake GPU 80GB" (device index 0)."""
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(configs, "_device_names", lambda index: "Fake GPU 80GB")
    configs.tuned_table.cache_clear()
    yield tmp_path / f"{configs.device_slug('Fake GPU 80GB')}.json"
    configs.tuned_table.cache_clear()


def test_launchers_read_the_tuned_winner_on_its_device_only(fake_gpu):
    win = configs.CANDIDATES["rel_pos_attention"]["global"][1]
    stale = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)   # not a candidate: never launched
    fake_gpu.write_text(json.dumps({"device": "Fake GPU 80GB", "entries": {
        "rel_pos_attention|global/64x64": {"config": win},
        "rel_pos_attention|global/80x80": {"config": stale},
        "compress|net3_3x3_s2": {"config": configs.CANDIDATES["compress"]["net3_3x3_s2"][1]}}}))
    default = configs.REL_POS_ATTENTION["global"]
    pick = lambda side, device: configs.rel_pos_attention_config(0, side, side, device)[1]  # noqa: E731
    assert pick(64, "cuda:0")["BLOCK_M"] == win["BLOCK_M"] and pick(64, "cuda:0")["num_warps"] == win["num_warps"]
    assert pick(64, "cuda:0")["LP_H"] == 128   # derived fields still follow the shape
    assert pick(64, torch.device("cpu")) == pick(64, None) == {**default, "LP_H": 128, "LP_W": 128}
    assert pick(80, "cuda:0")["BLOCK_M"] == default["BLOCK_M"]          # stale entry ignored
    assert pick(40, "cuda:0")["BLOCK_M"] == default["BLOCK_M"]          # untuned key: default
    assert configs.compress_config("net3_3x3_s2", 1024, "cuda:0")["BLOCK_N"] == 64
    with configs.forced("rel_pos_attention", "global/64x64", default):   # the tuner's override wins
        assert pick(64, "cuda:0")["BLOCK_M"] == default["BLOCK_M"]
    qr = next(c for c in configs.CANDIDATES["rel_pos_attention"]["global"] if "MAX_LP" in c)
    with configs.forced("rel_pos_attention", "global/64x64", qr):       # fits Base's 128-row tables
        got = pick(64, None)
        assert got["QR_TILE"] == 16 and got["BLOCK_M"] == qr["BLOCK_M"] and "MAX_LP" not in got
    with configs.forced("rel_pos_attention", "global/80x80", qr):       # Large's 256 rows: the default instead
        assert pick(80, None) == {**default, "LP_H": 256, "LP_W": 256}


def _setup(**kw):
    return tune.Setup(torch.device("cpu"), "triton-interpret", torch.bfloat16, reduced=True, warmup=0, repeats=1, **kw)


def test_tune_loop_checks_then_times_each_candidate():
    s = _setup()
    case = next(c for c in tune.cases(s, quick=True) if c.kernel == "rel_pos_attention" and c.entry == "windowed")
    results = tune.tune_case(s, case, log=lambda *_: None)
    assert len(results) == len(configs.CANDIDATES["rel_pos_attention"]["windowed"])
    assert all(r.median_ms is not None and r.repeats == 1 and not r.skipped for r in results), results


def test_tune_loop_refuses_wrong_results_and_unvetted_configs():
    s = _setup()
    case = next(c for c in tune.cases(s, quick=True) if c.key == "net3_3x3_s2")
    oracle = case.oracle
    case.oracle = lambda *a: oracle(*a) + 0.5    # a kernel disagreeing with the reference is never timed
    results = tune.tune_case(s, case, log=lambda *_: None)
    assert all(r.median_ms is None and r.skipped.startswith("wrong result") for r in results)
    case.oracle = oracle
    s.static_rows = {("compress", "net3_3x3_s2"): [dict(error="", spill_bytes=0)],
                     ("compress", "net3_3x3_s2#1"): [dict(error="", spill_bytes=8)]}
    first, second = tune.tune_case(s, case, log=lambda *_: None)
    assert first.median_ms is not None and second.median_ms is None and "8 B spilled" in second.skipped


def test_gpu_check_exits_2_without_a_gpu():
    if subprocess.run("command -v nvidia-smi", shell=True).returncode == 0:
        pytest.skip("nvidia-smi is present")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "no GPU" in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side,window,block_m,block_n", [
    (10, 0, 64, 32),    # q tile spanning rows, partial last tiles
    (3, 0, 64, 32),     # tiny grid: QR_TILE grows past 16 (the launcher sizes it)
    (10, 6, 32, 16),    # windows, the last ones padded (pad_kv keys unmasked)
])
def test_qr_per_key_tile_variant_matches_reference(side, window, block_m, block_n, dtype):
    """The QR_TILE path of the SAM kernel (q.R_h per key tile, only the w table on chip) against
    the reference, through the op with the config forced as the tuner forces it."""
    from conftest import assert_close

    import deepencoder_kernels as dk
    from deepencoder_kernels import reference

    heads, d = 2, 32
    qkv = torch.randn(2, side, side, 3 * heads * d).mul_(0.5).to(dtype)
    rows = 2 * (window or 14) - 1      # global tables resized to the grid by the op, as in the model
    th, tw = (torch.randn(rows, d).mul_(0.3).to(dtype) for _ in range(2))
    pad = torch.randn(3 * heads * d).mul_(0.5).to(dtype) if window else None
    entry, seq = ("windowed" if window else "global"), window or side
    cand = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2, QR_TILE=16)
    with configs.forced("rel_pos_attention", configs.tuning_key("rel_pos_attention", entry, seq, seq), cand):
        assert configs.rel_pos_attention_config(window, seq, seq)[1]["QR_TILE"] == (64 if side == 3 else 16)
        with dk.backend("triton-interpret"):
            out = dk.ops.rel_pos_attention(qkv, th, tw, num_heads=heads, window_size=window, pad_kv=pad)
            assert dk.last_backends()["rel_pos_attention"].backend == "triton-interpret"
    f = lambda t: None if t is None else t.float()  # noqa: E731
    assert_close(out, reference.rel_pos_attention(f(qkv), f(th), f(tw), heads, window, f(pad)), dtype)


def test_causal_flow_candidates_are_checked_then_timed():
    """V2's causal-flow key (prefix-LM + GQA + RoPE): every candidate matches the reference in the
    interpreter (reduced shapes) and is timed."""
    s = _setup()
    case = next(c for c in tune.cases(s, quick=True) if c.kernel == "varlen_attention" and c.entry == "prefix")
    results = tune.tune_case(s, case, log=lambda *_: None)
    assert len(results) == len(configs.CANDIDATES["varlen_attention"]["prefix"])
    assert all(r.median_ms is not None and not r.skipped for r in results), results
