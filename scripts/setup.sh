#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv in .venv with the CPU build of torch first (so
# nothing pulls a multi-GB CUDA build), then this package (and its C++ extension) with the test extras and CuPy/NVRTC (which compiles
# the CUDA source of the CuPy path here; running it needs a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,cupy]"
python -c "import torch, deepencoder_kernels as dk; print('set up: torch', torch.__version__, '| deepencoder-kernels', dk.__version__)"
