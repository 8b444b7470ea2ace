"""`pytest -m gpu` is the GPU suite's one entry point: selecting GPU tests picks compiled Triton for the
process before any kernel is decorated; elsewhere the gpu tests skip with the reason."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import selects_gpu_only

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("expr,gpu_only", [("gpu", True), ("gpu and not slow", True), ("gpu or slow", True), ("", False),
                                           ("not gpu", False), ("slow", False), ("gpu or not gpu", False)])
def test_which_mark_expressions_make_a_gpu_process(expr, gpu_only):
    assert selects_gpu_only(expr) == gpu_only


def test_dash_m_gpu_compiles_and_skips_without_cuda():
    """A `-m gpu` process runs with TRITON_INTERPRET unset (even when the caller set it) and, on this
    CUDA-less machine, skips every gpu test saying so; a plain process skips them saying how to run them."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("DEEPENCODER_KERNELS_GPU_TESTS", None)
    test = "tests/test_varlen_attention_kernel.py::test_other_head_dims_and_scale"
    gpu = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", "gpu", test],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    assert "3 skipped" in gpu.stdout and "no CUDA device here" in gpu.stdout, gpu.stdout
    plain = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test + "[16-cuda-edge]"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "`pytest -m gpu`" in plain.stdout, plain.stdout + plain.stderr


def test_gpu_process_has_compiled_triton(pytestconfig):
    """In this process (whichever it is) the mode matches what the marks selected."""
    from deepencoder_kernels.dispatch import triton_interpret_mode

    assert triton_interpret_mode() != pytestconfig.gpu_process
