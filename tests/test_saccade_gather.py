"""The saccade op: the C++ backend against the reference (exact: it only selects and copies),
property-based over shapes/budgets/ties/NaNs, autograd, torch.compile, and the CUDA source built by
nvcc and NVRTC (it cannot run here)."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import deepencoder_kernels as dk
from deepencoder_kernels import extension, ops, reference
from deepencoder_kernels.static_report import _tool

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ORDERS = ("score", "spatial")


def run_both(*args, **kwargs):
    """The op on the C++ backend (checked to have run there) and on the reference."""
    with dk.backend("cpp"):
        got = ops.saccade_gather(*args, **kwargs)
    assert dk.last_backends()["saccade_gather"].backend == "cpp"
    with dk.backend("reference"):
        want = ops.saccade_gather(*args, **kwargs)
    return got, want


def assert_same(got, want):
    for name, g, w in zip(("gathered", "positions", "cu_seqlens_out"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs:\n{g}\n{w}"


def plain_topk(scores: list[float], k: int, spatial: bool) -> list[int]:
    """The documented rule, written independently of torch: NaN last, higher score first, lower index first."""
    order = sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0, i))
    chosen = order[:k]
    return sorted(chosen) if spatial else chosen


def test_extension_is_built():
    assert extension.MISSING is None, extension.MISSING
    info = extension.EXTENSION.build_info()
    assert info["cplusplus"] >= 201703 and info["compiler"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
def test_cpp_matches_reference_batched(dtype, order):
    B, N, C = 4, 300, 24
    scores = torch.randn(B, N).to(dtype)
    scores[0, 5:40] = 0.25                                  # ties
    scores[1, ::7] = float("nan")                           # NaNs, chosen only when k exceeds the numbers
    scores[2, :3] = torch.tensor([float("inf"), -float("inf"), -0.0]).to(dtype)
    scores[2, 3] = 0.0                                      # +0 ties -0: lower index first
    features = torch.randn(B, N, C).to(dtype)
    k = torch.tensor([60, N, 0, 1])
    got, want = run_both(scores, features, k, order=order)
    assert_same(got, want)
    for b, (start, end) in enumerate(zip(want[2][:-1].tolist(), want[2][1:].tolist())):
        assert got[1][start:end].tolist() == plain_topk(scores[b].float().tolist(), int(k[b]), order == "spatial")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_matches_reference_packed(dtype):
    lengths = [1, 4096, 0, 257, 65]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scores = torch.randn(sum(lengths)).to(dtype)
    features = torch.randn(sum(lengths), 768).to(dtype)
    k = torch.tensor([1, 273, 0, 257, 17])
    for order in ORDERS:
        got, want = run_both(scores, features, k, cu_seqlens=cu, order=order)
        assert_same(got, want)
        assert got[0].shape == (sum(k.tolist()), 768)


@st.composite
def problems(draw):
    lengths = draw(st.lists(st.integers(0, 70), min_size=1, max_size=5))
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.5, math.inf, -math.inf, math.nan, 1e-3, -7.0])
    scores = [draw(values) for _ in range(sum(lengths))]
    budgets = [draw(st.sampled_from([0, 1, n, n // 2, max(n - 1, 0)])) if n else 0 for n in lengths]
    budgets = [min(max(b, 0), n) for b, n in zip(budgets, lengths)]
    dtype = draw(st.sampled_from(DTYPES))
    order = draw(st.sampled_from(ORDERS))
    channels = draw(st.integers(1, 9))
    packed = draw(st.booleans()) or len(set(lengths)) > 1
    return lengths, scores, budgets, dtype, order, channels, packed


@settings(max_examples=150, deadline=None)
@given(problems())
def test_cpp_property_against_reference(problem):
    """Random shapes, budgets (0, 1, N, mixed), ties, +-0, infinities and NaNs, every dtype and order."""
    lengths, scores, budgets, dtype, order, channels, packed = problem
    s = torch.tensor(scores, dtype=torch.float32).to(dtype)
    f = torch.randn(len(scores), channels).to(dtype)
    k = torch.tensor(budgets, dtype=torch.int64)
    if packed:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        got, want = run_both(s, f, k, cu_seqlens=cu, order=order)
    else:
        B, N = len(lengths), lengths[0]
        got, want = run_both(s.view(B, N), f.view(B, N, channels), k, order=order)
    assert_same(got, want)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for b in range(len(lengths)):
        image = s[starts[b]:starts[b + 1]].float().tolist()
        a, e = int(got[2][b]), int(got[2][b + 1])
        assert got[1][a:e].tolist() == plain_topk(image, budgets[b], order == "spatial")


def test_cpp_backward_scatters_into_features():
    scores = torch.randn(3, 50)
    features = torch.randn(3, 50, 8, requires_grad=True)
    k = torch.tensor([7, 0, 50])
    with dk.backend("cpp"):
        out, pos, _ = ops.saccade_gather(scores, features, k)
    assert dk.last_backends()["saccade_gather"].backend == "cpp"
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    expected = torch.zeros(3 * 50, 8)
    rows = torch.cat([pos[:7], pos[7:] + 100])
    expected[rows] = weight
    assert torch.equal(features.grad.view(-1, 8), expected)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_straight_through_score_gradient(backend):
    scores = torch.randn(2, 30, requires_grad=True)
    features = torch.randn(2, 30, 4, requires_grad=True)
    with dk.backend(backend):
        out, pos, cu = ops.saccade_gather(scores, features, 5, score_grad="straight_through")
        plain, _, _ = ops.saccade_gather(scores, features, 5)
    assert torch.equal(out, plain)                                   # forward unchanged
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    rows = pos + torch.tensor([0] * 5 + [30] * 5)
    expected = torch.zeros(60)
    expected[rows] = (weight * plain.detach()).sum(-1)
    assert torch.allclose(scores.grad.view(-1), expected)
    with dk.backend(backend):
        s2 = scores.detach().requires_grad_(True)
        ops.saccade_gather(s2, features, 5)[0].sum().backward()
    assert s2.grad is None                                           # no estimator: scores get nothing


def test_rejects_foreign_device_and_unknown_options():
    # (non-contiguous views are accepted: tests/test_boundaries.py)
    with pytest.raises(ValueError, match="features must be on cpu"):
        ops.saccade_gather(torch.randn(2, 8), torch.randn(2, 8, 4, device="meta"), 3)
    with pytest.raises(ValueError, match="score_grad must be one of"):
        ops.saccade_gather(torch.randn(2, 8), torch.randn(2, 8, 4), 3, score_grad="gumbel")


@pytest.mark.parametrize("k,total", [([3, 1], -1), ([3, 3], 6)], ids=["sum-read", "host-total"])
def test_cpp_passes_opcheck(k, total):
    torch.library.opcheck(torch.ops.deepencoder_kernels.saccade_gather,
                          (torch.randn(2, 8), torch.randn(2, 8, 4), torch.tensor(k), None, False, total, "cpp"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles_fullgraph_without_graph_break():
    def step(scores, features, k):
        gathered, positions, cu = ops.saccade_gather(scores, features, k, order="spatial")
        return gathered * 2, positions, cu

    scores, features, k = torch.randn(2, 64), torch.randn(2, 64, 16), torch.tensor([5, 9])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with dk.backend("cpp"):
        got = compiled(scores, features, k)
        want = step(scores, features, k)
    assert_same(got, want)


# ---- the CUDA source: nvcc (sm_80, sm_90a) and NVRTC (the CuPy path) ---------------------------

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


@pytest.mark.skipif(not Path(NVCC).exists(), reason="nvcc is not installed (CI has it: the CUDA file must compile there)")
def test_cuda_source_compiles_for_sm80_and_sm90a(tmp_path):
    obj = tmp_path / "saccade_gather.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-DDK_WITH_CUDA", "-Werror", "all-warnings", f"-I{ROOT / 'csrc'}",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
           str(ROOT / "csrc" / "saccade_gather.cu"), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(obj)], capture_output=True, text=True,
                           check=True).stdout
    for arch in ("sm_80", "sm_90a"):
        section = usage.split(f"arch = {arch}")[1].split("arch = ")[0]
        kernels = re.findall(r"Function (\w+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", section)
        assert {name for name, *_ in kernels} >= {"saccade_select", "saccade_gather_rows_16"}, section
        for name, regs, stack, shared, local in kernels:
            assert int(stack) == 0 and int(local) == 0, f"{arch} {name} spills: {section}"
            assert int(shared) < 48 * 1024, f"{arch} {name} needs {shared} B of shared memory"


def test_cupy_path_passes_the_kernels_parameters_in_order():
    """The CuPy launch cannot run here; its argument list is checked against the kernel's source."""
    from deepencoder_kernels import cupy_saccade

    source = cupy_saccade.cuda_source()
    signature = re.search(r"saccade_select\(([^)]*)\)", source).group(1)
    names = tuple(re.findall(r"(\w+)\s*(?:,|$)", signature.replace("\n", " ")))
    assert names == cupy_saccade.SELECT_PARAMS
    assert f"#define DK_SELECT_THREADS {cupy_saccade.SELECT_THREADS}" in source


def test_cupy_path_compiles_with_nvrtc():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="install the 'cupy' extra (CI does)")
    from deepencoder_kernels import cupy_saccade

    source = cupy_saccade.cuda_source()
    assert "#include" not in source and "score_key" in source  # the shared ranking rule is inlined
    for arch in ("sm_80", "sm_90a"):
        cubin = cupy_saccade.compile_cubin(arch)
        assert cubin[:4] == b"\x7fELF"
        assert b"saccade_select" in cubin and b"saccade_gather_rows_16" in cubin


# ---- the selection module and the encoder option -------------------------------------------------

from deepencoder_kernels.modules import SaccadeSelector  # noqa: E402
from deepencoder_kernels.modules.saccade import base_token_count  # noqa: E402


def test_budget_scales_with_resolution():
    sel = SaccadeSelector(feature_dim=8, out_dim=4)
    assert [base_token_count(s) for s in (32, 40, 64, 80)] == [73, 111, 273, 421]
    assert [sel.budget(s) for s in (32, 40, 64, 80)] == [73, 111, 273, 421]
    assert SaccadeSelector(feature_dim=8, out_dim=4, budget_ratio=0.5).budget(64) == 136
    assert SaccadeSelector(feature_dim=8, out_dim=4, budget_ratio=100).budget(8) == 64  # at most every position


def _selector(query_dim=None):
    torch.manual_seed(1)
    sel = SaccadeSelector(feature_dim=16, out_dim=12, query_dim=query_dim, key_dim=8, pos_grid=8).eval()
    with torch.no_grad():
        sel.pos_embed.normal_()
    return sel


def test_selector_picks_the_top_scores_and_adds_positions():
    sel = _selector()
    trunk = torch.randn(2, 8, 8, 16)
    tokens, positions, cu = sel(trunk, k=torch.tensor([5, 9]))
    normed = sel.norm(trunk.reshape(2, 64, 16))
    scores = sel.scores(normed)
    for b, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want = reference.saccade_select(scores[b], e - a, spatial_order=True)
        assert torch.equal(positions[a:e], want)
        expected = sel.proj(normed[b, want]) + sel.pos_embed.reshape(64, -1)[want]
        torch.testing.assert_close(tokens[a:e], expected)


def test_query_aware_selection_depends_on_the_query():
    sel = _selector(query_dim=6)
    trunk = torch.randn(1, 8, 8, 16)
    picks = {tuple(sel(trunk, k=6, query=torch.randn(1, 6))[1].tolist()) for _ in range(4)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="built without query_dim"):
        _selector()(trunk, k=3, query=torch.randn(1, 6))


def test_selector_trains_its_scorer_through_the_straight_through_estimator():
    sel = _selector(query_dim=6).train()
    tokens, _, _ = sel(torch.randn(2, 8, 8, 16), k=7, query=torch.randn(2, 6))
    tokens.square().sum().backward()
    for name in ("content.weight", "query_proj.weight", "key_proj.weight", "proj.weight", "pos_embed"):
        grad = dict(sel.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_encoder_appends_saccade_tokens_after_the_base_layout():
    from PIL import Image

    from conftest import small_encoder

    enc = small_encoder()
    image = Image.new("RGB", (900, 700), "white")
    plain = enc.encode(image, "base")[0]
    enc.saccades = SaccadeSelector(feature_dim=64, out_dim=24, budget_ratio=0.25).eval()
    out = enc.encode(image, "base")[0]
    assert out.shape == (273 + round(0.25 * 273), 24)
    assert torch.equal(out[:273], plain)          # the upstream layout is untouched
    assert any(key.startswith("saccades.") for key in enc.state_dict())


@pytest.mark.skipif(not Path(NVCC).exists(), reason="nvcc is not installed (CI has it)")
def test_extension_builds_and_loads_with_cuda(tmp_path):
    """CMakeLists.txt with DEEPENCODER_KERNELS_CUDA=ON compiles the .cu into _C and links the CUDA
    runtime statically; the module loads on this GPU-less machine and offers the CUDA entry point."""
    import pybind11

    cmd = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
           "-DDEEPENCODER_KERNELS_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DOUTPUT_DIR={tmp_path / 'out'}"]
    for step in (cmd, ["cmake", "--build", str(tmp_path)]):
        r = subprocess.run(step, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    so = next((tmp_path / "out").glob("_C*.so"))
    probe = ("from deepencoder_kernels import extension as e; info = e.EXTENSION.build_info(); "
             "assert info['cuda'] and hasattr(e.EXTENSION, 'saccade_gather_cuda'), info; print('ok')")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env={**os.environ, "DEEPENCODER_KERNELS_EXTENSION": str(so)})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
