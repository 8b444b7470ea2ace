#!/usr/bin/env bash
# Build the C++ extension with AddressSanitizer + UndefinedBehaviorSanitizer and run the saccade
# op's tests (the property-based one included) and the boundary tests (layout fuzz, value checks,
# the CUDA launcher's host code on the CPU) against that build. Any report fails the run.
# Needs the venv from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BUILD=build/sanitize
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDEEPENCODER_KERNELS_SANITIZE=ON \
  -DPython_EXECUTABLE="$PWD/$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DOUTPUT_DIR="$PWD/$BUILD" > "$BUILD.log"
cmake --build "$BUILD" >> "$BUILD.log"
SO=$(ls "$BUILD"/_C*.so)
# Python itself is not instrumented: preload the runtimes, and leave leak checking to the C++ tests'
# scope (CPython's own allocations at exit are not ours).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export DEEPENCODER_KERNELS_EXTENSION="$PWD/$SO"
$PY -c "from deepencoder_kernels import extension as e; assert e.EXTENSION.build_info()['address_sanitizer'], e.MISSING; print('sanitized extension:', e.EXTENSION.__file__)"
# the op's tests, and the boundary tests that reach C++: the layout fuzz through the extension, its
# value checks, threads, and the CUDA launcher's real host code (the emulation built instrumented too)
# (--capture=sys: a sanitizer report, written to fd 2 just before the abort, reaches the log)
export DEEPENCODER_KERNELS_EMULATION_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
$PY -m pytest -q -p no:cacheprovider --capture=sys tests/test_saccade_gather.py -k "cpp or property or backward or straight"
$PY -m pytest -q -p no:cacheprovider --capture=sys tests/test_boundaries.py -k "saccade or cpp or host or cupy or thread or task or compiled"
