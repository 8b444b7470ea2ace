"""The static kernel report: every shipped config vs the committed baseline (AOT, sm_80 + sm_90a),
and proof that the gate fails on a spilling, slower or broken config."""
import os
import subprocess
import sys
from pathlib import Path

from deepencoder_kernels import static_report as sr

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "baselines" / "static_report.json"


def run_compiled(code: str) -> subprocess.CompletedProcess:
    """Compiled (not interpreted) Triton needs a process whose triton never saw TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_shipped_configs_match_baseline():
    r = run_compiled(f"from deepencoder_kernels.static_report import main; raise SystemExit(main(['--check', {str(BASELINE)!r}]))")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 spills" in r.stdout and "sm_90a" in r.stdout and "large/global" in r.stdout


def test_gate_catches_a_spilling_config():
    """Build a deliberately oversized tile (global grid, 128 x 64 tiles on 8 warps) and check the
    real compiler output makes the gate fail."""
    code = """
from deepencoder_kernels import static_report as sr
from deepencoder_kernels.kernels.rel_pos_attention import _rel_pos_attention_fwd_kernel as k
sig = sr.rel_pos_attention_signature('bf16')
ce = dict(C=768, HEAD_DIM=64, WINDOWED=False, HAS_PAD=False, IEEE_DOT=False, UPCAST_DOT=False, BLOCK_M=128, BLOCK_N=64, LP_H=128, LP_W=128)
sig.update({c: 'constexpr' for c in ce})
row = sr.Row('rel_pos_attention', 'base/global', 'oversized', 'sm_90a', 'bf16', **sr.compile_figures(k, sig, ce, 'sm_90a', 8, 2))
found = sr.problems([row], None)
print(row)
assert row.spill_bytes > 0 and any('spills' in f for f in found), found
print('gate failed as it should')
"""
    r = run_compiled(code)
    assert r.returncode == 0 and "gate failed as it should" in r.stdout, r.stdout + r.stderr


def test_gate_rules():
    ok = sr.Row("k", "base/global", "global", "sm_80", "bf16", registers=170, spill_bytes=0, shared_bytes=1024, tensor_core_instructions=48)
    baseline = {"rows": [{"key": ok.key, "registers": 170, "tensor_core_instructions": 48}]}
    assert sr.problems([ok], baseline) == []
    grown = sr.Row(**{**ok.__dict__, "registers": 190})
    assert "registers grew 170 -> 190" in sr.problems([grown], baseline)[0]
    no_tc = sr.Row(**{**ok.__dict__, "tensor_core_instructions": 0})
    assert any("no tensor-core" in p for p in sr.problems([no_tc], baseline))
    big_smem = sr.Row(**{**ok.__dict__, "shared_bytes": 200 * 1024})
    assert any("shared memory" in p for p in sr.problems([big_smem], baseline))
    broken = sr.Row(**{**ok.__dict__, "error": "CompilationError: boom"})
    assert "does not compile" in sr.problems([broken], baseline)[0]
    new = sr.Row(**{**ok.__dict__, "case": "huge/global"})
    assert "not in the baseline" in sr.problems([new], baseline)[0]
