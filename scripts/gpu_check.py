"""What one GPU lease can prove and measure, in one command that brings the headline numbers back first.

    bash scripts/gpu_check.sh [--budget SECONDS] [--resume DIR] [--out DIR] [--dry-run]

A lease is 15 minutes of device time in all (the machine's start, every command and idle wait
counted), at most 10 minutes a command, at most 8 result files back. So the steps below run in the
order a first run must learn things: install, a smoke test of every kernel, the headline
benchmarks, then the full GPU test suite, compute-sanitizer, the tuner and the rest.

  --budget SECONDS  the whole run's time (default 540: a 9-minute command). Each step gets the
                    smaller of its own limit and what is left; a step that no longer fits is not
                    started, one the budget cuts short is stopped (SIGINT, so pytest still writes
                    what it ran); both are left for --resume.
  --resume DIR      run only what the run that wrote DIR did not finish (steps cut by the budget or
                    never started; a benchmark that was "not present" is looked for again), keeping
                    its results: a second, shorter command.
  --out DIR         the output folder (default: $OUT when set, else build/gpu_check; with $OUT a copy
                    also goes to build/gpu_check, which the device machine keeps between commands,
                    so the next command can --resume build/gpu_check).
  --dry-run         the same steps on the CPU (Triton's interpreter, reduced shapes, .venv's Python;
                    the GPU parts of the benchmarks say they skipped). CI runs it with --budget 540,
                    with a budget that cuts a step, and with --resume of that run.

After every step the results and the summary are rewritten, so a command cut at its limit still
brings back what it measured. The output folder holds at most 8 files:
  gpu_check_<device>.json   summary: every step's status, seconds and limit, versions, what is left
  gpu_check_<device>.log    everything the steps printed
  all_<device>.json         every result file this run (and the run it resumed) wrote, by name
                            (python benchmarks/render_results.py --unpack FILE puts them in benchmarks/results)
  RESULTS.md                benchmarks/RESULTS.md rendered from the committed results + this run's
  pytest_gpu_<device>.xml   pytest -m gpu (JUnit XML)
  tuned_<device>.json       the tuner's winners (commit as kernels/tuned/<device>.json)
  static_report_<device>.json
Exit: 0 every step done and nothing failed; 3 nothing failed but steps are left for --resume (the
summary names them and gives the command); 1 a step failed or ran past its own limit; 2 no GPU here
or a wrong argument.

On a lent machine (the session's device tool: $OUT comes back, build/ stays while the machine is warm):
  bash scripts/gpu_check.sh                                   timeout_s 600: the first command
  bash scripts/gpu_check.sh --resume build/gpu_check --budget 200   what it left, if time remains
(a fresh machine keeps nothing: copy the files that came back into a folder of the tree, carry it,
--resume that folder; the install steps then run again before the steps that were left).

The steps are data: STEPS in scripts/gpu_check.py, one line each. A benchmark not written yet is one
line whose script is absent: reported "not present", not a failure. The smoke test's kernels: SMOKE.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 540
GRACE_S = 15          # after SIGINT, a step has this long to write what it has before SIGKILL
MIN_START_S = 10      # a step is not started with less than this left
MAX_FILES = 8         # what comes back from a GPU machine
FALLBACK_SITE = ROOT / "build" / "gpu_check_site"   # scripts/gpu_install.sh's link farm, when pip cannot install
SAME = "same"         # Step.dry: the dry run runs the GPU command itself (the script skips its GPU part)

# Statuses: a step that "passed", "failed" or hit its own limit ("timeout") is finished; one "cut"
# by the budget or "not run" (no time left) is left for --resume; "skipped" and "not present" are
# looked at again on a resume (cheap, and a benchmark may have been added in between).
FINISHED = ("passed", "failed", "timeout")
LEFT = ("cut", "not run", "pending")


@dataclass(frozen=True)
class Step:
    """One step. Commands are split like a shell line (no pipes); leading NAME=value words set the
    environment. Placeholders: {py} the Python, {tag} the device tag, {results} this run's result
    folder (merged into all_<tag>.json after each step; the benchmarks write there through
    DEEPENCODER_KERNELS_RESULTS), {out} the output folder."""

    name: str
    group: str                  # install | smoke | headline | suite | more
    limit: int                  # seconds at most; the budget may give less
    what: str                   # one line for --help and the summary
    gpu: str                    # the command on a GPU machine
    dry: str | None = SAME      # the command in --dry-run; None: skipped there, saying why_not_dry
    why_not_dry: str = ""
    cwd: str = ""               # relative to the repository root
    needs: str = ""             # a file the step runs: when absent, "not present" (a benchmark not written yet)
    whole: bool = False         # start only when the full limit fits (a build cut short is wasted)
    keep: tuple = ()            # (a file the step writes, its name in {out} and {results}): copied there afterwards
    setup: bool = False         # sets up this machine: a resume runs it again where the package does not import (a fresh machine)


# The smoke test: each kernel once at a real shape (Base grid, CLIP's mixed pack), every dtype its
# test covers: does it compile, does it match the reference. A group is the words a test's pytest id
# must contain besides its file's name (together one pytest -k expression); tests/test_gpu_check.py
# checks that every group selects a test.
SMOKE = [
    ("SAM attention, windowed, Base", "tests/test_rel_pos_attention_kernel.py", ("test_windowed_matches_reference", "B1-64x64")),
    ("SAM attention, global, Base", "tests/test_rel_pos_attention_kernel.py", ("test_global_matches_reference", "B1-64x64")),
    ("varlen attention, CLIP mixed pack", "tests/test_varlen_attention_kernel.py", ("test_matches_per_sequence_reference", "65-101-257-401-65")),
    ("varlen attention + rel-pos, mixed grids", "tests/test_varlen_attention_kernel.py", ("test_rel_pos_bias_per_sequence_grid", "mixed")),
    ("neck + compressor, Base grid", "tests/test_compress_kernel.py", ("test_every_mode_grid", "B1-64-")),
    ("SAM attention backward", "tests/test_rel_pos_attention_backward.py", ("test_gradients_at_real_shapes", "cuda-0-")),
    ("varlen attention backward", "tests/test_varlen_attention_backward.py", ("test_gradients_at_real_shapes", "cuda-0-")),
    ("compressor backward", "tests/test_compress_backward.py", ("test_full_channels_at_real_shapes", "cuda-0-")),
    ("saccade gather, CuPy/NVRTC", "tests/test_saccade_cuda.py", ("test_cupy_nvrtc_bit_exact_vs_cpu", "1-4096-768-273")),
]


def smoke_words(path: str, words: tuple) -> tuple:
    """A group's -k words, its test file's name first (pytest -k also matches the module's name)."""
    return (Path(path).stem, *words)


def smoke_args() -> str:
    files = " ".join(dict.fromkeys(f for _, f, _ in SMOKE))
    expr = " or ".join("(" + " and ".join(smoke_words(f, words)) + ")" for _, f, words in SMOKE)
    return f"{files} -k {shlex.quote(expr)}"


PYTEST = "{py} -m pytest -q -p no:cacheprovider"
GPU_TESTS = "DEEPENCODER_KERNELS_GPU_TESTS=1 "

# The steps, in the order they run. A new benchmark: one line in its group (it writes into
# DEEPENCODER_KERNELS_RESULTS through benchmarks/common.py write_result; render_results.py renders it).
STEPS = [
    # -- install: no dependency resolution (the machine has its own torch/Triton, no index); the
    #    CuPy/NVRTC saccade path needs no build, so nvcc waits for "install-nvcc" below
    Step("install", "install", 240, "pip install -e without dependencies; the C++ CPU op built by CMake",
         "bash scripts/gpu_install.sh", None, "dry run: .venv already holds the package (scripts/setup.sh)", setup=True),
    Step("backends", "install", 60, "which backends run here, and why the others do not", "{py} -m deepencoder_kernels info"),
    # -- smoke: every kernel compiled once at a real shape, checked against the reference
    Step("smoke", "smoke", 180, "every kernel at one real shape: compiles, matches the reference (SMOKE)",
         GPU_TESTS + PYTEST + " -m gpu -rs " + smoke_args(), PYTEST + " -m gpu " + smoke_args()),
    # -- headline benchmarks: warm medians, side by side in one run
    Step("e2e-v1", "headline", 150, "DeepEncoder v1, a Base view end to end: upstream's computation vs this package",
         "{py} bench_end_to_end.py --modes base", cwd="benchmarks", needs="benchmarks/bench_end_to_end.py"),
    Step("e2e-v2", "headline", 150, "DeepEncoder V2, a page (dynamic tiles) end to end: upstream's computation vs this package",
         "{py} bench_end_to_end.py --model v2", cwd="benchmarks", needs="benchmarks/bench_end_to_end.py"),
    Step("sam-attention", "headline", 180, "SAM rel-pos attention at Base (windowed, global; batch 1, 32) vs dense-bias SDPA, FlexAttention",
         PYTEST + " bench_rel_pos_attention.py -k 'base and not forward_backward' --benchmark-json {results}/rel_pos_attention_{tag}.json",
         cwd="benchmarks", needs="benchmarks/bench_rel_pos_attention.py"),
    Step("causal-flow", "headline", 150, "V2 causal-flow attention vs dense-mask SDPA, FlexAttention, two-call flash",
         "{py} bench_causal_flow.py", cwd="benchmarks", needs="benchmarks/bench_causal_flow.py"),
    Step("compress", "headline", 150, "neck + compressor at Base (batch 1, 32) vs PyTorch's cuDNN convs (NCHW, channels-last), torch.compile",
         "{py} bench_compress.py --timing-only --modes base --batches 1 32", cwd="benchmarks", needs="benchmarks/bench_compress.py"),
    Step("packed", "headline", 180, "CLIP varlen attention vs padded SDPA + mask, nested SDPA, flash-attn; the 42-view mixed batch vs the per-image loop",
         "{py} bench_packed.py", cwd="benchmarks", needs="benchmarks/bench_packed.py"),
    # -- the suite: the nvcc build only when its whole limit fits (the tests of the nvcc build need it)
    Step("install-nvcc", "suite", 180, "the CUDA saccade kernels built by nvcc into the extension (only when the whole limit fits)",
         "bash scripts/gpu_install.sh --nvcc", None, "dry run: no nvcc build (CI builds the CUDA sources with NVRTC)", whole=True,
         setup=True),
    Step("pytest-gpu", "suite", 420, "pytest -m gpu: every kernel test at the real shapes, compiled; CUDA graphs, inductor",
         GPU_TESTS + PYTEST + " -m gpu -rs --junitxml {out}/pytest_gpu_{tag}.xml",
         PYTEST + " -m gpu --junitxml {out}/pytest_gpu_{tag}.xml"),
    Step("sanitizer-memcheck", "suite", 180, "compute-sanitizer memcheck on the saccade kernels (every path, bit-exact vs the CPU op)",
         "compute-sanitizer --tool memcheck --error-exitcode 1 {py} scripts/saccade_driver.py",
         "{py} scripts/saccade_driver.py --device cpu"),
    Step("sanitizer-racecheck", "suite", 180, "compute-sanitizer racecheck on the saccade kernels",
         "compute-sanitizer --tool racecheck --error-exitcode 1 {py} scripts/saccade_driver.py",
         None, "dry run: the driver ran once above (memcheck's rehearsal)"),
    Step("tune", "suite", 420, "the tuner at Base shapes: every candidate config checked, timed; winners to kernels/tuned/<device>.json",
         "{py} -m deepencoder_kernels tune --quick --out kernels/tuned/{tag}.json",
         "{py} -m deepencoder_kernels tune --dry-run --out {results}/tuned_{tag}.json",
         keep=("kernels/tuned/{tag}.json", "tuned_{tag}.json")),
    # -- more, when time is left (usually a resumed run)
    Step("profile-base", "more", 180, "the profiler's Base report: per-stage CUDA-event times, FLOPs, peak memory",
         "{py} -m deepencoder_kernels profile --mode base --repeat 5 --quiet --json {results}/profile_base_{tag}.json",
         "{py} -m deepencoder_kernels profile --mode tiny --quiet --json {results}/profile_tiny_{tag}.json"),
    Step("saccade-bench", "more", 120, "saccade gather: the CUDA kernels vs torch.topk + gather, per-image budgets vs a loop",
         "{py} bench_saccade_gather.py", None, "dry run: CI's regression gate times the C++ op on the CPU",
         cwd="benchmarks", needs="benchmarks/bench_saccade_gather.py"),
    Step("sam-attention-training", "more", 240, "SAM attention forward + backward at Base vs dense-bias SDPA, FlexAttention",
         PYTEST + " bench_rel_pos_attention.py -k 'base and forward_backward' --benchmark-json {results}/rel_pos_attention_training_{tag}.json",
         cwd="benchmarks", needs="benchmarks/bench_rel_pos_attention.py"),
    Step("static-report", "more", 300, "the static report on this machine's Triton (CPU work; CI checks Triton 3.6 and 3.9)",
         "{py} -W ignore -m deepencoder_kernels static-report --check benchmarks/baselines/static_report.json --json {out}/static_report_{tag}.json",
         None, "dry run: the test suite runs it (tests/test_static_report.py)"),
    Step("benchmarks-all", "more", 540, "every benchmark at every mode (benchmarks/run_all.py --quick)",
         "{py} benchmarks/run_all.py --quick --no-render", None, "dry run: its scripts ran above, one by one"),
]


def steps_table(steps=STEPS) -> str:
    lines = [f"{'':>3} {'step':<24}{'limit s':>8}  {'group':<9} what"]
    for i, s in enumerate(steps, 1):
        lines.append(f"{i:>3} {s.name:<24}{s.limit:>8}  {s.group:<9} {s.what}")
    return "\n".join(lines)


# ---- planning: what runs, with how much time (pure functions: tests/test_gpu_check.py) ---------------


def step_limit(step: Step, left: float) -> tuple[int | None, str]:
    """Seconds to give ``step`` with ``left`` seconds of budget remaining: (limit, "") or (None, why not)."""
    usable = left - GRACE_S
    if step.whole and usable < step.limit:
        return None, f"budget: {max(0, int(usable))} s left, needs its whole {step.limit} s"
    if usable < MIN_START_S:
        return None, f"budget: {max(0, int(left))} s left"
    return int(min(step.limit, usable)), ""


def to_run(step: Step, previous: dict | None, fresh_machine: bool = False) -> bool:
    """On a resume: whether ``step`` still has to run (the previous run did not finish it, or it
    sets up the machine and this is a fresh one: the device machine keeps nothing once given back)."""
    return previous is None or previous.get("status") not in FINISHED or step.setup and fresh_machine


def timeout_status(given: int, step: Step) -> str:
    """A step stopped at its limit: "cut" when the budget shortened it (left for --resume), else "timeout"."""
    return "cut" if given < step.limit else "timeout"


# ---- running --------------------------------------------------------------------------------------


@dataclass
class Run:
    py: str
    tag: str
    out: Path
    results: Path
    log: Path
    budget: float
    start: float
    dry: bool
    mirror: Path | None = None
    info: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)           # every step's environment (before its own words)
    records: list = field(default_factory=list)      # one dict per step, in STEPS order
    resumed: str | None = None
    rendered: bool = False                            # RESULTS.md rendered without an error, last time

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        with open(self.log, "a") as f:
            f.write(text + "\n")


def expand(step_cmd: str, run: Run) -> tuple[list[str], dict]:
    words = shlex.split(step_cmd)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    values = dict(py=run.py, tag=run.tag, results=str(run.results), out=str(run.out))
    return [w.format(**values) for w in words], env


def execute(run: Run, argv: list[str], env: dict, cwd: Path, limit: int) -> tuple[int, bool]:
    """Run one command under ``limit`` seconds, its output to the terminal and the log.
    Returns (exit status, whether it was stopped at the limit)."""
    full_env = dict(run.env, **env)
    try:
        child = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    except OSError as e:
        run.say(f"gpu_check: cannot start {argv[0]}: {e}")
        return 127, False

    def pump():
        with open(run.log, "ab") as log:
            for line in iter(child.stdout.readline, b""):
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
                log.write(line)
                log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = False
    try:
        child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        stopped = True
        stop(child)
    except KeyboardInterrupt:    # the run itself is stopped (SIGINT, or SIGTERM below): the step goes first
        stop(child)
        reader.join(timeout=10)
        raise
    reader.join(timeout=10)
    return child.returncode, stopped


def stop(child: subprocess.Popen) -> None:
    """SIGINT to the step's process group (pytest then writes its summary and XML), SIGKILL after GRACE_S."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(run: Run, step: Step, record: dict) -> None:
    if step.needs and not (ROOT / step.needs).exists():
        record.update(status="not present", note=f"{step.needs} is not in this tree")
        run.say(f"\n==> {step.name}: not present ({step.needs} is not in this tree)")
        return
    command = step.gpu
    if run.dry:
        if step.dry is None:
            record.update(status="skipped", note=step.why_not_dry)
            run.say(f"\n==> {step.name}: skipped: {step.why_not_dry}")
            return
        command = step.gpu if step.dry == SAME else step.dry
    left = run.left()
    limit, why = step_limit(step, left)
    if limit is None:
        record.update(status="not run", note=why)
        run.say(f"\n==> {step.name}: not run ({why}); left for --resume")
        return
    argv, env = expand(command, run)
    shown = " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(argv)])
    env = dict(env, PYTHON=run.py, DEEPENCODER_KERNELS_RESULTS=str(run.results))
    if FALLBACK_SITE.is_dir():   # scripts/gpu_install.sh linked the package there (pip could not install it)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FALLBACK_SITE), run.env.get("PYTHONPATH")]))
    run.say(f"\n==> {step.name} (limit {limit} s of its {step.limit}; {int(time.monotonic() - run.start)} s into the run, "
            f"{int(left)} s of budget left)\n$ {'cd ' + step.cwd + ' && ' if step.cwd else ''}{shown}")
    t0 = time.monotonic()
    record.update(status="pending", limit_s=limit)
    rc, stopped = execute(run, argv, env, ROOT / step.cwd, limit)
    seconds = round(time.monotonic() - t0, 1)
    status = timeout_status(limit, step) if stopped else ("passed" if rc == 0 else "failed")
    note = ""
    if status == "cut":
        note = f"budget: stopped after {limit} s of its {step.limit} s; left for --resume"
    elif status == "timeout":
        note = f"ran past its limit of {step.limit} s"
    if step.keep and not run.dry:
        src, name = (part.format(tag=run.tag) for part in step.keep)
        if (ROOT / src).exists():
            for folder in (run.out, run.results):
                shutil.copy2(ROOT / src, folder / name)
    record.update(status=status, exit=rc, seconds=seconds, note=note)
    run.say(f"<== {step.name}: {status} (exit {rc}) in {seconds} s" + (f": {note}" if note else ""))


# ---- writing what is known after every step -------------------------------------------------------


def write_outputs(run: Run, render: bool = True) -> dict:
    """all_<tag>.json, RESULTS.md (``render``: after a step that ran) and the summary, as they stand now."""
    merged = {}
    for path in sorted(run.results.glob("*.json")):
        if not path.stem.startswith("all_"):
            try:
                merged[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as e:     # a step's broken file must not stop the run
                merged[path.stem] = dict(error=f"not readable as JSON: {e}")
    (run.out / f"all_{run.tag}.json").write_text(json.dumps(merged, indent=1))
    if render:
        done = subprocess.run([run.py, str(ROOT / "benchmarks" / "render_results.py"), "--results", str(ROOT / "benchmarks" / "results"),
                               "--results", str(run.results), "--results-md", str(run.out / "RESULTS.md"), "--no-readme"],
                              capture_output=True, text=True)
        run.rendered = done.returncode == 0
        if not run.rendered:
            run.say(f"gpu_check: rendering RESULTS.md failed (the JSON is in all_{run.tag}.json):\n{done.stderr.strip()[-2000:]}")
    left = [r["step"] for r in run.records if r["status"] in LEFT]
    failed = [r["step"] for r in run.records if r["status"] in ("failed", "timeout")]
    files = sorted(p.name for p in run.out.iterdir())
    resume_dir = run.mirror or run.out
    summary = dict(run.info, dry_run=run.dry, budget_s=run.budget, elapsed_s=round(time.monotonic() - run.start, 1),
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), resumed_from=run.resumed,
                   complete=not left, left=left, failed=failed, rendered=run.rendered,
                   resume=f"bash scripts/gpu_check.sh --resume {resume_dir}" + (" --dry-run" if run.dry else "") if left else None,
                   steps=run.records)
    files = sorted(set(files) | {f"gpu_check_{run.tag}.json"})
    summary["files"] = files
    (run.out / f"gpu_check_{run.tag}.json").write_text(json.dumps(summary, indent=1))
    if run.mirror is not None:
        run.mirror.mkdir(parents=True, exist_ok=True)
        for p in run.out.iterdir():
            if p.is_file():
                shutil.copy2(p, run.mirror / p.name)
    return summary


def print_summary(run: Run, summary: dict) -> int:
    run.say(f"\n{'step':<24}{'status':<12}{'exit':>5}{'seconds':>9}{'limit':>7}  note")
    for r in summary["steps"]:
        exit_ = "" if r.get("exit") is None else r["exit"]
        note = (r.get("note") or "") + (" (previous run)" if r.get("previous_run") else "")
        run.say(f"{r['step']:<24}{r['status']:<12}{exit_:>5}{r.get('seconds', 0):>9.1f}{r.get('limit_s') or '':>7}  {note}")
    files = summary["files"]
    run.say(f"\n{summary['device']}: {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
            f"{len(files)} files in {run.out}: {', '.join(files)}")
    if summary["left"]:
        run.say(f"left for later ({', '.join(summary['left'])}): {summary['resume']}")
    code = 1 if summary["failed"] else 3 if summary["left"] else 0
    if len(files) > MAX_FILES:
        run.say(f"gpu_check: {len(files)} files in {run.out}, but only {MAX_FILES} come back from a GPU machine")
        code = 1
    return code


# ---- the machine ----------------------------------------------------------------------------------

PROBE = r"""
import json, platform, re, sys
info = dict(python=platform.python_version())
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available())
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name()
    else:
        try:
            from deepencoder_kernels.profiler import device_name
            info["device"] = device_name(torch.device("cpu"))
        except Exception:
            info["device"] = platform.processor() or platform.machine() or "cpu"
except Exception as e:
    info.update(torch=f"unavailable ({type(e).__name__}: {e})", cuda=False, device=platform.processor() or platform.machine() or "cpu")
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = f"unavailable ({type(e).__name__})"
print(json.dumps(info))
"""


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip().splitlines()
        return out[-1] if out else "unavailable"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def probe(py: str) -> dict:
    r = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, timeout=300)
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = dict(torch=f"unavailable ({r.stderr.strip()[-300:]})", cuda=False, device="unknown")
    info.update(nvcc=version(["nvcc", "--version"]), driver=version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                commit=version(["git", "rev-parse", "--short", "HEAD"]))
    return info


def package_imports(run: Run) -> bool:
    env = dict(run.env)
    if FALLBACK_SITE.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FALLBACK_SITE), env.get("PYTHONPATH")]))
    return subprocess.run([run.py, "-c", "import deepencoder_kernels"], cwd=ROOT, env=env, capture_output=True).returncode == 0


def has_gpu() -> bool:
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU") for line in listed.splitlines())


# ---- entry point ----------------------------------------------------------------------------------


def load_previous(folder: Path, tag: str) -> tuple[dict, dict]:
    """A previous run's summary (steps by name) and results (stem -> JSON) from its output folder."""
    summary_path = folder / f"gpu_check_{tag}.json"
    if not summary_path.exists():
        found = sorted(p.name for p in folder.glob("gpu_check_*.json")) if folder.is_dir() else []
        raise SystemExit(f"gpu_check: --resume {folder}: no gpu_check_{tag}.json there"
                         + (f" (found {', '.join(found)}: another device's run)" if found else ""))
    summary = json.loads(summary_path.read_text())
    all_path = folder / f"all_{tag}.json"
    results = json.loads(all_path.read_text()) if all_path.exists() else {}
    return {r["step"]: r for r in summary.get("steps", [])}, results


def parse(argv):
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Steps, in the order they run (limit: seconds at most; the budget may give less):\n"
                                        + steps_table())
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="SECONDS", help=f"seconds for the whole run (default {DEFAULT_BUDGET})")
    ap.add_argument("--resume", type=Path, metavar="DIR", help="run only what the run in DIR did not finish")
    ap.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: $OUT, else build/gpu_check)")
    ap.add_argument("--dry-run", action="store_true", help="rehearse every step on the CPU (CI runs it)")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error("--budget must be a positive number of seconds")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    py = os.environ.get("PYTHON") or sys.executable
    start = time.monotonic()
    if not args.dry_run and not has_gpu():
        print("gpu_check: no GPU on this machine (nvidia-smi lists none); bash scripts/gpu_check.sh --dry-run rehearses the steps on the CPU")
        return 2
    info = probe(py)
    if not args.dry_run and not info.get("cuda"):
        print(f"gpu_check: {py} has no CUDA-enabled torch that sees the GPU (torch {info.get('torch')})")
        return 2
    tag = "dry-run" if args.dry_run else re.sub(r"[^A-Za-z0-9.]+", "_", info["device"]).strip("_")
    env_out = os.environ.get("OUT")
    out = args.out or (Path(env_out) if env_out else None) or args.resume or ROOT / "build" / "gpu_check"
    out = out.resolve()
    mirror = (ROOT / "build" / "gpu_check").resolve() if args.out is None and env_out and out != (ROOT / "build" / "gpu_check").resolve() else None
    previous, previous_results = load_previous(args.resume.resolve(), tag) if args.resume else ({}, {})
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results = work / "results"
    results.mkdir()
    for stem, content in previous_results.items():
        (results / f"{stem}.json").write_text(json.dumps(content, indent=1))
    if args.resume and args.resume.resolve() != out:
        for name in (f"pytest_gpu_{tag}.xml", f"tuned_{tag}.json", f"static_report_{tag}.json"):
            if (args.resume / name).exists() and not (out / name).exists():
                shutil.copy2(args.resume / name, out / name)
    log = out / f"gpu_check_{tag}.log"
    if not (args.resume and args.resume.resolve() == out):
        log.write_text("")
    # each step picks its Triton mode (the dry run's tests set it themselves)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    run = Run(py=py, tag=tag, out=out, results=results, log=log, budget=args.budget, start=start, dry=args.dry_run, mirror=mirror,
              info=dict(device=info["device"], tag=tag, **{k: v for k, v in info.items() if k not in ("device", "cuda")}),
              resumed=str(args.resume) if args.resume else None, env=env)
    run.say(f"gpu_check: {info['device']} ({'dry run, ' if args.dry_run else ''}budget {args.budget:.0f} s"
            + (f", resuming {args.resume}" if args.resume else "") + f"); output in {out}")
    fresh = bool(args.resume) and not args.dry_run and not package_imports(run)
    if fresh:
        run.say("gpu_check: the package does not import here (a fresh machine?): its install steps run again")
    for step in STEPS:
        prev = previous.get(step.name)
        if args.resume and not to_run(step, prev, fresh):
            run.records.append(dict(prev, previous_run=True))
        else:
            run.records.append(dict(step=step.name, group=step.group, status="pending", exit=None, seconds=0.0, limit_s=None, note=""))
    write_outputs(run)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous_handler = signal.signal(signal.SIGTERM, interrupted)
    try:
        for step, record in zip(STEPS, run.records):
            if record.get("previous_run"):
                run.say(f"\n==> {step.name}: {record['status']} in the previous run")
                continue
            try:
                run_step(run, step, record)
            finally:
                write_outputs(run, render=record.get("limit_s") is not None)   # only a step that ran can add results
    except KeyboardInterrupt as e:
        for record in run.records:
            if record["status"] == "pending" and record.get("limit_s"):
                record.update(status="cut", note=f"the run was interrupted ({e or 'SIGINT'}); left for --resume")
        run.say(f"\ngpu_check: interrupted ({e or 'SIGINT'})")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    for record in run.records:
        if record["status"] == "pending":
            record.update(status="not run", note=record.get("note") or "the run ended first; left for --resume")
    summary = write_outputs(run, render=False)
    shutil.rmtree(work, ignore_errors=True)
    return print_summary(run, summary)


if __name__ == "__main__":
    sys.exit(main())
