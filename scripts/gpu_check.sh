#!/usr/bin/env bash
# What one GPU lease can prove and measure, headline numbers first, within --budget seconds
# (default 540); --resume DIR finishes what a cut run left; --dry-run rehearses it on the CPU.
# The steps and the options: bash scripts/gpu_check.sh --help (the runner is scripts/gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  case " $* " in
    *" --dry-run "*) PY=$PWD/.venv/bin/python; [ -x "$PY" ] || PY=$(command -v python3) ;;   # CI's set-up
    *) PY=$(command -v python3) ;;    # a GPU machine's own Python (its CUDA torch)
  esac
fi
export PYTHON=$PY
exec "$PY" scripts/gpu_check.py "$@"
