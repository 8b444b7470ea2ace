#!/usr/bin/env bash
# Everything a short stay on a GPU machine can prove, tune and measure, in one command:
#   install (no dependency resolution; the CUDA extension built by nvcc) -> backends -> static report
#   on this Triton -> pytest -m gpu -> compute-sanitizer memcheck + racecheck on the saccade kernels
#   -> tuner -> the Base profile -> every benchmark -> README re-rendered from the JSON.
# Results land in ONE folder of at most 8 files ($OUT when set, else --out, else build/gpu_check):
#   gpu_check_<device>.json (steps, status, seconds, versions), gpu_check_<device>.log (all output),
#   all_<device>.json (every result), tuned_<device>.json, static_report_<device>.json,
#   pytest_gpu_<device>.xml, README.md.
# Each step runs under a time limit; a failing step is reported and the next one runs; the summary
# table comes from what the steps returned. Exit: 0 all passed, 1 a step failed, 2 no GPU here.
#
#   bash scripts/gpu_check.sh [--quick] [--dry-run] [--out DIR]
#   --quick    under 6 minutes on one H100: Base shapes in the tuner, quick benchmarks, no static report
#   --dry-run  the same steps on the CPU (Triton's interpreter, reduced shapes, .venv's Python); CI runs it
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0
DRY=0
DEST=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --out) DEST=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  [ -x "$PY" ] || PY=$(command -v python3)
else
  PY=${PYTHON:-$(command -v python3)}
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no GPU on this machine (nvidia-smi lists none); bash scripts/gpu_check.sh --dry-run rehearses the steps on the CPU"
    exit 2
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: $PY has no CUDA-enabled torch that sees the GPU"
    exit 2
  fi
fi

if [ "$DRY" = 1 ]; then TAG=dry-run; else
  TAG=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9.]+', '_', torch.cuda.get_device_name()).strip('_'))"); fi
DEST=${DEST:-$ROOT/build/gpu_check}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS=$WORK/results            # this run's result files only (merged into all_<device>.json)
mkdir -p "$RESULTS"
LOG=$DEST/gpu_check_$TAG.log
: > "$LOG"
STEPS=$WORK/steps.tsv
: > "$STEPS"
BEGIN=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET   # each step picks its Triton mode; the dry run's interpreter steps set it themselves

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log, time, record; never stops the script
step() {
  local name=$1 limit=$2 t0 rc secs status
  shift 2
  t0=$(date +%s.%N)
  say ""
  say "==> $name (limit ${limit}s, $(( $(date +%s) - BEGIN ))s into the run)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  secs=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
  case $rc in
    0) status=passed ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "${NOTE:-}" >> "$STEPS"
  say "<== $name: $status (exit $rc) in ${secs}s"
  NOTE=
}

skip() {  # skip NAME WHY
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "skipped" "" "0" "$2" >> "$STEPS"
  say ""
  say "==> $1: skipped: $2"
}

limit() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }   # limit FULL QUICK

# ---- 1. install --------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip install "dry run: .venv already holds the package (scripts/setup.sh); on a GPU: DEEPENCODER_KERNELS_CUDA=1 pip install --no-deps --no-build-isolation -e ."
else
  step install 480 env DEEPENCODER_KERNELS_CUDA=1 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
  if ! "$PY" -c "import deepencoder_kernels" 2>/dev/null; then
    # pip could not build it (e.g. an older setuptools there): the package from the source tree
    # through a link farm on PYTHONPATH, the extension built by CMake straight into it
    SITE=$WORK/site/deepencoder_kernels
    mkdir -p "$SITE"
    for f in python/deepencoder_kernels/* kernels csrc; do ln -s "$ROOT/$f" "$SITE/"; done
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    step install-fallback 480 bash -c "cmake -S . -B '$WORK/build' -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEEPENCODER_KERNELS_CUDA=ON \
      -DPython_EXECUTABLE='$PY' -Dpybind11_DIR=\"\$('$PY' -m pybind11 --cmakedir)\" -DOUTPUT_DIR='$SITE' && cmake --build '$WORK/build'"
  fi
fi

# ---- 2. what can run here ----------------------------------------------------------------------
step backends 120 "$PY" -m deepencoder_kernels info

# ---- 3. static report on this machine's Triton ---------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip static-report "dry run: the test suite runs it (tests/test_static_report.py)"
elif [ "$QUICK" = 1 ]; then
  skip static-report "--quick (CPU-only work, checked in CI for Triton 3.6 and 3.9)"
else
  step static-report 420 "$PY" -W ignore -m deepencoder_kernels static-report \
    --check benchmarks/baselines/static_report.json --json "$DEST/static_report_$TAG.json"
fi

# ---- 4. the CUDA test suite --------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  NOTE="dry run: CPU, every gpu test skips with its reason" step pytest-gpu 240 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs --junitxml "$DEST/pytest_gpu_$TAG.xml"
else
  step pytest-gpu "$(limit 540 150)" env DEEPENCODER_KERNELS_GPU_TESTS=1 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs $([ "$QUICK" = 1 ] && echo "-x") --junitxml "$DEST/pytest_gpu_$TAG.xml"
fi

# ---- 5. compute-sanitizer on the saccade kernels -------------------------------------------------
if [ "$DRY" = 1 ]; then
  NOTE="dry run: the driver's calls on the CPU op, no compute-sanitizer" step saccade-driver 120 \
    "$PY" scripts/saccade_driver.py --device cpu
else
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" "$(limit 240 90)" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" scripts/saccade_driver.py
  done
fi

# ---- 6. tuner ----------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  step tune 240 "$PY" -m deepencoder_kernels tune --dry-run --out "$RESULTS/tuned_$TAG.json"
else
  # the launchers read kernels/tuned/<device>.json: the benchmarks below run the winners
  step tune "$(limit 420 120)" "$PY" -m deepencoder_kernels tune $([ "$QUICK" = 1 ] && echo "--quick") \
    --out "kernels/tuned/$TAG.json"
  [ -f "kernels/tuned/$TAG.json" ] && cp "kernels/tuned/$TAG.json" "$RESULTS/tuned_$TAG.json"
fi
[ -f "$RESULTS/tuned_$TAG.json" ] && cp "$RESULTS/tuned_$TAG.json" "$DEST/"

# ---- 7. the profiler's Base report, then every benchmark -----------------------------------------
if [ "$DRY" = 1 ]; then   # reduced: the smallest mode through the same profiler
  NOTE="dry run: mode tiny" step profile 300 "$PY" -m deepencoder_kernels profile --mode tiny --quiet \
    --json "$RESULTS/profile_tiny_cpu.json"
else
  step profile-base "$(limit 300 90)" "$PY" -m deepencoder_kernels profile --mode base --quiet --json "$RESULTS/profile_base_$TAG.json"
fi
if [ "$DRY" = 1 ]; then
  step benchmarks 300 env DEEPENCODER_KERNELS_RESULTS="$RESULTS" "$PY" benchmarks/run_all.py --dry-run --no-render
else
  step benchmarks "$(limit 900 150)" env DEEPENCODER_KERNELS_RESULTS="$RESULTS" \
    "$PY" benchmarks/run_all.py $([ "$QUICK" = 1 ] && echo "--quick") --no-render
fi
ALL=$(ls "$RESULTS"/all_*.json 2>/dev/null | head -1)
[ -n "$ALL" ] && cp "$ALL" "$DEST/all_$TAG.json"

# ---- 8. README re-rendered from the committed results + this run's -------------------------------
mkdir -p "$WORK/render"
cp benchmarks/results/*.json "$WORK/render/" 2>/dev/null
cp "$RESULTS"/*.json "$WORK/render/" 2>/dev/null
rm -f "$WORK"/render/all_*.json
cp README.md "$DEST/README.md"
step render-readme 120 env DEEPENCODER_KERNELS_RESULTS="$WORK/render" DEEPENCODER_KERNELS_README="$DEST/README.md" \
  "$PY" benchmarks/render_results.py

# ---- summary -----------------------------------------------------------------------------------
"$PY" - "$STEPS" "$DEST" "$TAG" "$(( $(date +%s) - BEGIN ))" "$DRY" "$QUICK" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, platform, subprocess, sys, time
steps_path, dest, tag, total, dry, quick = sys.argv[1:7]
steps = []
for line in open(steps_path):
    name, status, rc, secs, note = line.rstrip("\n").split("\t")
    steps.append(dict(step=name, status=status, exit=int(rc) if rc else None, seconds=float(secs), note=note))
def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
    except Exception as e:
        return f"unavailable ({type(e).__name__})"
import torch, triton
info = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            dry_run=dry == "1", quick=quick == "1", date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            total_seconds=int(total), python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
            nvcc=version(["nvcc", "--version"]), driver=version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            commit=version(["git", "rev-parse", "--short", "HEAD"]), steps=steps)
json.dump(info, open(os.path.join(dest, f"gpu_check_{tag}.json"), "w"), indent=1)
print(f"\n{'step':<20}{'status':<10}{'exit':>5}{'seconds':>9}  note")
for s in steps:
    print(f"{s['step']:<20}{s['status']:<10}{'' if s['exit'] is None else s['exit']:>5}{s['seconds']:>9.1f}  {s['note']}")
files = sorted(os.listdir(dest))
print(f"\n{info['device']}: {total} s in all; {len(files)} files in {dest}: {', '.join(files)}")
if len(files) > 8:
    print(f"more than 8 files in {dest}: only 8 come back from a GPU machine")
    sys.exit(1)
sys.exit(1 if any(s["status"] in ("failed", "timeout") for s in steps) else 0)
EOF
exit "${PIPESTATUS[0]}"
