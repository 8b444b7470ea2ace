"""scripts/gpu_check.py, the GPU lease's runner: the budget, the resume, what comes back, the step
list. Fast: stand-in steps are shell commands (true, sleep, exit 3); the real steps' dry run is CI's
(.ci/run runs it with --budget 540, with a budget that cuts a step, and --resume of that run)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check    # dataclasses look the module up while the class is made
spec.loader.exec_module(gpu_check)
Step = gpu_check.Step


def test_each_step_gets_the_smaller_of_its_limit_and_what_is_left(monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 15)
    monkeypatch.setattr(gpu_check, "MIN_START_S", 10)
    step = Step("s", "headline", 150, "", "true")
    assert gpu_check.step_limit(step, 540) == (150, "")
    assert gpu_check.step_limit(step, 100) == (85, "")          # the grace to stop it is kept back
    limit, why = gpu_check.step_limit(step, 20)                 # 5 s usable: not worth starting
    assert limit is None and "budget" in why
    build = Step("b", "suite", 240, "", "true", whole=True)    # a build cut short is wasted
    assert gpu_check.step_limit(build, 255) == (240, "")
    limit, why = gpu_check.step_limit(build, 200)
    assert limit is None and "whole 240 s" in why
    assert gpu_check.timeout_status(85, step) == "cut"          # shortened by the budget: left for --resume
    assert gpu_check.timeout_status(150, step) == "timeout"     # its own limit: a failure


def test_resume_runs_only_what_was_not_finished():
    step = Step("s", "headline", 150, "", "true")
    for status in ("passed", "failed", "timeout"):
        assert not gpu_check.to_run(step, dict(status=status))
    for status in ("cut", "not run", "pending", "skipped", "not present"):
        assert gpu_check.to_run(step, dict(status=status))
    assert gpu_check.to_run(step, None)
    install = Step("i", "install", 240, "", "true", setup=True)   # the device machine keeps nothing once given back
    assert not gpu_check.to_run(install, dict(status="passed")) and gpu_check.to_run(install, dict(status="passed"), fresh_machine=True)
    assert not gpu_check.to_run(step, dict(status="passed"), fresh_machine=True)


def test_the_order_of_a_first_run_and_the_help_lists_it():
    names = [s.name for s in gpu_check.STEPS]
    groups = [s.group for s in gpu_check.STEPS]
    assert names[0] == "install" and groups == sorted(groups, key=["install", "smoke", "headline", "suite", "more"].index)
    assert names.index("smoke") < names.index("e2e-v1") < names.index("install-nvcc") < names.index("pytest-gpu") \
        < names.index("sanitizer-memcheck") < names.index("tune")
    assert len(set(names)) == len(names)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    listed = [line.split()[1] for line in r.stdout.split("Steps, in the order they run")[1].splitlines()[2:] if line.strip()]
    assert listed == names


def test_every_smoke_group_selects_a_gpu_test():
    """The smoke step is one pytest -k expression over test names: a renamed test would drop out
    silently, so each group must still select at least one test of its file."""
    files = list(dict.fromkeys(f for _, f, _ in gpu_check.SMOKE))
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                       capture_output=True, text=True, cwd=ROOT)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert ids, r.stdout + r.stderr
    for kernel, path, words in gpu_check.SMOKE:
        assert any(all(w in i for w in gpu_check.smoke_words(path, words)) for i in ids), f"smoke group {kernel!r} selects no test"


def fake_steps(tmp_path):
    """Stand-ins for the real steps: one writes a result, one fails, one is not in the tree, one is
    long enough for a small budget to cut, one comes after it."""
    return [
        Step("writes-result", "install", 30, "", f"cp {tmp_path}/result.json {{results}}/fake_result.json"),
        Step("fails", "smoke", 30, "", "sh -c 'exit 3'"),
        Step("absent", "headline", 30, "", "sh -c 'exit 1'", needs="benchmarks/no_such_benchmark.py"),
        Step("long", "headline", 30, "", f"sh -c 'test -e {tmp_path}/go || sleep 30'"),   # cut, until "go" exists
        Step("after", "suite", 30, "", "true", None, "not in the dry run"),
        Step("last", "more", 30, "", "true"),
    ]


def run_main(monkeypatch, argv):
    monkeypatch.setattr(gpu_check, "probe", lambda py: dict(device="stand-in CPU", torch="x", triton="y", cuda=False))
    return gpu_check.main(argv)


def test_a_cut_run_brings_back_its_results_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "STEPS", fake_steps(tmp_path))
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "MIN_START_S", 1)
    out = tmp_path / "out"
    (tmp_path / "result.json").write_text('{"rows": []}')

    code = run_main(monkeypatch, ["--dry-run", "--budget", "5", "--out", str(out)])   # "long" gets what is left
    summary = json.loads((out / "gpu_check_dry-run.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"writes-result": "passed", "fails": "failed", "absent": "not present", "long": "cut",
                      "after": "skipped", "last": "not run"}, summary
    assert code == 1 and summary["failed"] == ["fails"] and summary["left"] == ["long", "last"] and not summary["complete"]
    assert "--resume" in summary["resume"]
    assert json.loads((out / "all_dry-run.json").read_text()) == {"fake_result": {"rows": []}}
    files = sorted(p.name for p in out.iterdir())
    assert files == ["RESULTS.md", "all_dry-run.json", "gpu_check_dry-run.json", "gpu_check_dry-run.log"]
    assert "not measured on a GPU yet" in (out / "RESULTS.md").read_text()
    assert "left for later (long, last)" in capsys.readouterr().out

    (tmp_path / "go").touch()
    code = run_main(monkeypatch, ["--dry-run", "--budget", "20", "--resume", str(out)])
    summary = json.loads((out / "gpu_check_dry-run.json").read_text())
    status = {s["step"]: (s["status"], bool(s.get("previous_run"))) for s in summary["steps"]}
    assert status == {"writes-result": ("passed", True), "fails": ("failed", True), "absent": ("not present", False),
                      "long": ("passed", False), "after": ("skipped", False), "last": ("passed", False)}
    assert summary["complete"] and code == 1   # the earlier failure stands
    assert json.loads((out / "all_dry-run.json").read_text()) == {"fake_result": {"rows": []}}   # kept from the first run


def test_resume_exits_3_while_steps_are_left_and_refuses_another_devices_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "STEPS", [Step("a", "install", 30, "", "true"), Step("b", "smoke", 30, "", "sleep 30")])
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "MIN_START_S", 1)
    out = tmp_path / "out"
    assert run_main(monkeypatch, ["--dry-run", "--budget", "5", "--out", str(out)]) == 3    # nothing failed, "b" is left
    (out / "gpu_check_dry-run.json").rename(out / "gpu_check_NVIDIA_H200.json")
    with pytest.raises(SystemExit, match="no gpu_check_dry-run.json there .found gpu_check_NVIDIA_H200.json"):
        run_main(monkeypatch, ["--dry-run", "--resume", str(out)])


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "has_gpu", lambda: False)
    assert gpu_check.main([]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no GPU" in out[0] and "--dry-run" in out[0]
