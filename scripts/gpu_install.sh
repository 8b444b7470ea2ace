#!/usr/bin/env bash
# The package on a GPU machine with its own torch/Triton and no package index (scripts/gpu_check.sh's
# install steps): pip install -e without resolving dependencies; CMake builds the C++ CPU op.
# --nvcc: the CUDA saccade kernels too, built by nvcc into the extension (the CuPy/NVRTC path needs
# no build). When pip cannot install it (e.g. an older setuptools there), the package is linked from
# the source tree into build/gpu_check_site (gpu_check puts that on PYTHONPATH) and the extension
# built there by CMake.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CUDA=0
[ "${1:-}" = --nvcc ] && CUDA=1
SITE=build/gpu_check_site
if [ ! -d "$SITE" ]; then
  DEEPENCODER_KERNELS_CUDA=$CUDA "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
    && "$PY" -c "import deepencoder_kernels" && exit 0
  echo "gpu_install: pip could not install the package; linking it from the source tree into $SITE"
fi
mkdir -p "$SITE/deepencoder_kernels"
for f in python/deepencoder_kernels/* kernels csrc; do ln -sfn "$PWD/$f" "$SITE/deepencoder_kernels/"; done
cmake -S . -B build/gpu_check_cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEEPENCODER_KERNELS_CUDA=$([ $CUDA = 1 ] && echo ON || echo OFF) \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DOUTPUT_DIR="$PWD/$SITE/deepencoder_kernels" \
  && cmake --build build/gpu_check_cmake \
  && PYTHONPATH=$SITE "$PY" -c "import deepencoder_kernels"
