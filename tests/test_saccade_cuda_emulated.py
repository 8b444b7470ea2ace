"""The CUDA saccade kernels themselves (csrc/saccade_gather_kernels.cuh, unchanged) executed on the
CPU through a minimal emulation of CUDA's block model (tests/cuda_emulation/cuda_on_cpu.h: a
std::thread per CUDA thread, barriers for __syncthreads and warp shuffles), against the reference.
This checks the kernels' logic (radix select, compaction, rank sort, row copy) on a machine with no
GPU; it says nothing about their speed, and real-GPU behaviour (memory model, warp scheduling)
still needs a GPU run."""
import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from deepencoder_kernels import reference
from deepencoder_kernels.ops.saccade_gather import SCORE_DTYPE_CODES

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if CXX is None:
        pytest.skip("g++ is not installed (CI has it)")
    lib = tmp_path_factory.mktemp("emu") / "saccade_emulated.so"
    cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'tests' / 'cuda_emulation'}", str(ROOT / "tests" / "cuda_emulation" / "saccade_emulated.cpp"), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fn = ctypes.CDLL(str(lib)).saccade_gather_emulated
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_longlong,
                   ctypes.c_longlong, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return fn


def run_kernels(fn, scores, features, k, cu_seqlens, spatial):
    """The host side of saccade_gather.cu, in Python: sizes, scratch, copy unit; then the kernels."""
    B = k.shape[0]
    total = int(k.sum())
    C = features.shape[-1]
    gathered = features.new_empty(total, C)
    positions = torch.empty(total, dtype=torch.int64)
    sources = torch.empty(total, dtype=torch.int64)
    cu_out = torch.full((B + 1,), -1, dtype=torch.int32)
    row_bytes = C * features.element_size()
    unit = next(u for u in (16, 8, 4, 2, 1) if (row_bytes | features.data_ptr() | gathered.data_ptr()) % u == 0)
    fn(scores.data_ptr(), SCORE_DTYPE_CODES[scores.dtype], 0 if cu_seqlens is None else cu_seqlens.data_ptr(),
       scores.shape[1] if cu_seqlens is None else 0, k.data_ptr(), B, total, features.data_ptr(), row_bytes, int(spatial),
       gathered.data_ptr(), positions.data_ptr(), sources.data_ptr(), cu_out.data_ptr(), unit)
    return gathered, positions, cu_out


def check(fn, scores, features, k, cu_seqlens=None, spatial=False):
    got = run_kernels(fn, scores, features, k, cu_seqlens, spatial)
    want = reference.saccade_gather(scores, features, k, cu_seqlens, spatial)
    for name, g, w in zip(("gathered", "positions", "cu_seqlens_out"), got, want):
        assert torch.equal(g, w), f"{name}:\n{g}\n{w}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial", [False, True])
def test_kernels_match_reference(emulated, dtype, spatial):
    """600 positions: several 256-thread chunks in the compaction; k up to 600: several in the rank sort."""
    B, N, C = 4, 600, 24
    scores = torch.randn(B, N).to(dtype)
    scores[0, 10:300] = 0.5                           # many ties around the threshold
    scores[1, ::3] = float("nan")
    scores[2, :4] = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0]).to(dtype)
    features = torch.randn(B, N, C).to(dtype)
    check(emulated, scores, features, torch.tensor([280, 500, 0, 600]), spatial=spatial)


def test_packed_lengths_and_odd_row_sizes(emulated):
    lengths = [1, 300, 0, 65]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scores = torch.randn(sum(lengths))
    for C, dtype in ((7, torch.float16), (3, torch.float32), (64, torch.bfloat16)):  # copy units 2, 4, 16
        check(emulated, scores, torch.randn(sum(lengths), C).to(dtype), torch.tensor([1, 257, 0, 13]), cu, spatial=False)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=3), st.data())
def test_kernels_property(emulated, lengths, data):
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, math.inf, -math.inf, math.nan, 1e-3])
    scores = torch.tensor([data.draw(values) for _ in range(sum(lengths))], dtype=torch.float32)
    k = torch.tensor([data.draw(st.integers(0, n)) for n in lengths], dtype=torch.int64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    check(emulated, scores.to(dtype), torch.randn(sum(lengths), 5).to(dtype), k, cu, spatial=data.draw(st.booleans()))


def test_many_images_output_offsets(emulated):
    """Each block sums the budgets before it with a warp-shuffle reduction: 40 images put budgets
    in every lane of the first warp and past it."""
    lengths = [3 + (i * 7) % 11 for i in range(40)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.tensor([(i * 5) % (n + 1) for i, n in enumerate(lengths)])
    check(emulated, torch.randn(sum(lengths)), torch.randn(sum(lengths), 4), k, cu, spatial=True)
