"""Boundaries: input layouts, devices, compiled calls and threads, for every op and backend.

Kernels read memory through raw pointers, the checks read logical values: a strided, expanded,
offset, transposed or negated view must give exactly what its contiguous copy gives (or a clear
error). The layout fuzz runs every op on every backend here (reference, Triton's interpreter, the
C++ extension) with tiny shapes; ``scripts/sanitize.sh`` runs it again against the ASan/UBSan build.
The ``gpu`` tests repeat it for the CUDA extension and the CuPy path: ``pytest -m gpu tests/test_boundaries.py``.
"""
import asyncio
import os
import threading
import time

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import dispatch, extension, ops
from conftest import assert_close

HAS_CPP = extension.MISSING is None
CPP_BACKENDS = ["cpp"] if HAS_CPP else []


# ---- the five cases of issue 16 -------------------------------------------------------------------

def _saccade(backend, *args, **kwargs):
    with dk.backend(backend):
        return ops.saccade_gather(*args, **kwargs)


def _assert_same_saccade(got, want):
    for name, g, w in zip(("gathered", "positions", "cu_seqlens_out"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), f"{name}:\n{g}\n{w}"


@pytest.mark.parametrize("backend", ["reference", *CPP_BACKENDS])
def test_saccade_strided_k_is_read_as_its_values(backend):
    scores, features = torch.randn(2, 8), torch.randn(2, 8, 4)
    k = torch.tensor([3, 2, 1, 2])[::2]                                 # logical [3, 1]
    got = _saccade(backend, scores, features, k)
    assert got[2].tolist() == [0, 3, 4] and got[0].shape == (4, 4)
    _assert_same_saccade(got, _saccade("reference", scores, features, torch.tensor([3, 1])))


@pytest.mark.parametrize("backend", ["reference", *CPP_BACKENDS])
def test_saccade_expanded_k_and_strided_cu_seqlens(backend):
    scores, features = torch.randn(2, 8), torch.randn(2, 8, 4)
    got = _saccade(backend, scores, features, torch.tensor(4).expand(2))   # stride 0: one int64 in memory
    _assert_same_saccade(got, _saccade("reference", scores, features, torch.tensor([4, 4])))
    packed, rows = torch.randn(12), torch.randn(12, 3)
    cu = torch.tensor([0, 99, 5, 99, 12, 99], dtype=torch.int32)[::2]      # logical [0, 5, 12]
    got = _saccade(backend, packed, rows, torch.tensor([2, 3]), cu)
    _assert_same_saccade(got, _saccade("reference", packed, rows, torch.tensor([2, 3]), cu.contiguous()))


def test_varlen_strided_cu_seqlens():
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 1, 4, 7, 10, 3], dtype=torch.int32)[::2]          # logical [0, 4, 10]
    with dk.backend("triton-interpret"):
        got = ops.varlen_attention(q, k, v, cu, 6)
        want = ops.varlen_attention(q, k, v, cu.contiguous(), 6)
    assert torch.equal(got, want)


def test_compress_strided_layer_norm_parameters():
    args = _compress_args(torch.float32)
    want = _fused("compress", args)
    for i in (2, 3, 5, 6):   # neck1_w, neck1_b, neck3_w, neck3_b
        strided = list(args)
        strided[i] = _strided(args[i])
        assert torch.equal(_fused("compress", strided), want), f"argument {i}"


# ---- views of the same values ------------------------------------------------------------------------

def _strided(t):
    """The values of ``t`` with every stride doubled (a slice of a buffer twice as long per dim)."""
    if t.dim() == 0:
        return t
    buf = torch.full([2 * n for n in t.shape], -77, dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def _rows_strided(t):
    """Unit stride in the last dim, the others padded (a kernel taking strides reads it in place)."""
    if t.dim() < 2:
        return _strided(t)
    buf = torch.full((*t.shape[:-1], t.shape[-1] + 5), -77, dtype=t.dtype, device=t.device)
    view = buf[..., 2:2 + t.shape[-1]]
    view.copy_(t)
    return view


def _offset(t):
    buf = torch.full((t.numel() + 3,), -77, dtype=t.dtype, device=t.device)
    view = buf[3:].view(t.shape)
    view.copy_(t)
    return view


def _transposed(t):
    if t.dim() < 2:
        return _strided(t)
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def _expanded(t):
    """Other values (the first slice repeated): compared with its own contiguous copy."""
    if t.dim() == 0 or t.shape[0] == 0:
        return t
    return t[:1].expand(t.shape)


def _negated(t):
    return torch._neg_view(-t) if t.dtype.is_floating_point else t


LAYOUTS = {"strided": _strided, "rows": _rows_strided, "offset": _offset, "transposed": _transposed,
           "expanded": _expanded, "negated": _negated}


VALUE_PRESERVING = ("strided", "rows", "offset", "transposed")


def _plain(t):
    return t if not isinstance(t, torch.Tensor) else t.resolve_neg().contiguous()


def _check_layouts(run, args, tensor_positions, exact, layouts=LAYOUTS, singles=True):
    """``run(args)`` with each tensor argument (``singles``), then all of them, replaced by each view
    kind; each result must equal the result on the views' contiguous copies."""
    same_values = run(args)
    for layout, make in layouts.items():
        for which in [*([i] for i in tensor_positions if singles), list(tensor_positions)]:
            viewed = list(args)
            for i in which:
                viewed[i] = make(args[i])
            got = run(viewed)
            want = same_values if layout in VALUE_PRESERVING else run([_plain(a) for a in viewed])
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                if exact:
                    assert g.shape == w.shape and torch.equal(g, w), f"{layout} views of arguments {which}"
                else:
                    assert_close(g, w, msg=f"{layout} views of arguments {which}")


def _fused(op, args):
    with dk.backend("triton-interpret"):
        out = getattr(ops, op)(*args)
    assert dk.last_backends()[op].backend == "triton-interpret"
    return out


def _on(backend, op):
    def run(args):
        with dk.backend(backend):
            out = getattr(ops, op)(*args)
        assert dk.last_backends()[op].backend == backend
        return out
    return run


def _compress_args(dtype, cin=4, cn=8, c2=4, c3=4, side=3):
    return [t.to(dtype) for t in (
        torch.randn(1, side, side, cin), torch.randn(cn, cin, 1, 1) / 2, 1 + 0.1 * torch.randn(cn), 0.1 * torch.randn(cn),
        torch.randn(cn, cn, 3, 3) / 8, 1 + 0.1 * torch.randn(cn), 0.1 * torch.randn(cn), torch.randn(c2, cn, 3, 3) / 6,
        torch.randn(c3, c2, 3, 3) / 6)]


# ---- the layout fuzz: every op, every backend here ---------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton-interpret", "sdpa-blocked"])
def test_rel_pos_attention_layouts(backend):
    heads, d = 1, 16
    qkv = torch.randn(2, 3, 3, 3 * heads * d) * 0.5
    args = [qkv, torch.randn(3, d) * 0.3, torch.randn(3, d) * 0.3, heads, 2, torch.randn(3 * heads * d) * 0.5]
    _check_layouts(_on(backend, "rel_pos_attention"), args, (0, 1, 2, 5), exact=backend != "reference", singles=False)


@pytest.mark.parametrize("backend", ["reference", "triton-interpret"])
def test_compress_layouts(backend):
    args = [*_compress_args(torch.float32, side=3), 1e-6]
    _check_layouts(_on(backend, "compress"), args, range(9), exact=backend != "reference", singles=False)


@pytest.mark.parametrize("backend", ["reference", "triton-interpret", "sdpa-blocked"])
@pytest.mark.parametrize("lengths", [[3, 0, 4], [1]])
def test_varlen_attention_layouts(backend, lengths):
    total, heads, d = sum(lengths), 2, 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, heads, d) for _ in range(3))

    def run(args):
        with dk.backend(backend):
            return ops.varlen_attention(*args, allow_empty=True)
    # cu_seqlens' values must stay valid: no expanded / negated views of it
    _check_layouts(run, [q, k, v, cu, max(lengths)], (0, 1, 2), exact=backend != "reference")
    _check_layouts(run, [q, k, v, cu, max(lengths)], (3,), exact=True,
                   layouts={n: LAYOUTS[n] for n in ("strided", "offset", "transposed")})


@pytest.mark.parametrize("backend", ["triton-interpret", "sdpa-blocked"])
def test_varlen_attention_bias_layouts(backend):
    lengths, d = [4, 6], 16
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    q, k, v = (torch.randn(10, 1, d) for _ in range(3))
    grid = torch.tensor([[2, 2], [2, 3]], dtype=torch.int32)
    args = [q, k, v, cu, 6, None, torch.randn(5, d) * 0.3, torch.randn(5, d) * 0.3, grid]
    _check_layouts(_on(backend, "varlen_attention"), args, (0, 6, 7), exact=True,
                   layouts={n: LAYOUTS[n] for n in ("strided", "rows", "expanded", "negated")})
    _check_layouts(_on(backend, "varlen_attention"), args, (3, 8), exact=True,
                   layouts={n: LAYOUTS[n] for n in ("strided", "offset", "transposed")})


@pytest.mark.parametrize("backend", ["reference", *CPP_BACKENDS])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_saccade_gather_layouts_batched(backend, order):
    scores, features = torch.randn(3, 7), torch.randn(3, 7, 5)
    scores[1, 2:5] = 0.5                                          # ties
    for k in (torch.tensor([0, 7, 3]), torch.tensor([7, 7, 7])):   # k = 0 and k = N
        def run(args):
            return _on(backend, "saccade_gather")(args + [None, order])
        _check_layouts(run, [scores, features, k], (0, 1), exact=True)
        _check_layouts(run, [scores, features, k], (2,), exact=True,
                       layouts={n: LAYOUTS[n] for n in ("strided", "offset", "expanded")})


@pytest.mark.parametrize("backend", ["reference", *CPP_BACKENDS])
def test_saccade_gather_layouts_packed_with_empty_images(backend):
    lengths = [4, 0, 6, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scores, features, k = torch.randn(11), torch.randn(11, 3), torch.tensor([2, 0, 6, 1])

    def run(args):
        return _on(backend, "saccade_gather")(args)
    _check_layouts(run, [scores, features, k, cu], (0, 1), exact=True)
    _check_layouts(run, [scores, features, k, cu], (2, 3), exact=True,
                   layouts={n: LAYOUTS[n] for n in ("strided", "offset")})


@pytest.mark.parametrize("backend", ["reference", *CPP_BACKENDS])
def test_saccade_gather_no_images_and_integer_dtypes(backend):
    gathered, positions, cu_out = _saccade(backend, torch.randn(0, 5), torch.randn(0, 5, 3), torch.zeros(0, dtype=torch.int64))
    assert gathered.shape == (0, 3) and positions.shape == (0,) and cu_out.tolist() == [0]
    with pytest.raises(TypeError, match=r"k must have dtype in \['torch.int64'\], got torch.int32"):
        _saccade(backend, torch.randn(2, 5), torch.randn(2, 5, 3), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"cu_seqlens must have dtype in \['torch.int32'\], got torch.int64"):
        _saccade(backend, torch.randn(5), torch.randn(5, 3), 1, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match=r"cu_seqlens must have dtype in \['torch.int32'\], got torch.int64"):
        q = torch.randn(5, 1, 16)
        ops.varlen_attention(q, q, q, torch.tensor([0, 5]), 5)


# ---- the range check where the Python checks do not run -----------------------------------------------

@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("k,cu,match", [
    (torch.tensor([9, 1]), None, "out of range"),
    (torch.tensor([-1, 1]), None, "out of range"),
    (torch.tensor([2, 6]), torch.tensor([0, 3, 8], dtype=torch.int32), "out of range"),
    (torch.tensor([1, 1]), torch.tensor([0, 9, 8], dtype=torch.int32), "cu_seqlens"),
    (torch.tensor([1, 1]), torch.tensor([0, 3, 9], dtype=torch.int32), "cu_seqlens"),
])
def test_cpp_checks_values_itself(k, cu, match):
    """The custom op called directly (no ops-layer checks) and under torch.compile (where they are
    skipped): the C++ side refuses out-of-range budgets and offsets instead of reading past its inputs."""
    scores = torch.randn(8) if cu is not None else torch.randn(2, 4)
    features = torch.randn(*scores.shape, 3)
    with pytest.raises(ValueError, match=match):
        torch.ops.deepencoder_kernels.saccade_gather(scores, features, k, cu, False, -1, "cpp")
    compiled = torch.compile(lambda s, f, kk, c: ops.saccade_gather(s, f, kk, c), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with dk.backend("cpp"), pytest.raises(ValueError, match=match):
        compiled(scores, features, k, cu)


# ---- backends per thread and per asyncio task --------------------------------------------------------

def _saccade_backend_probe():
    """One small saccade call; returns which backend ran (cpp and reference give the same values)."""
    ops.saccade_gather(torch.randn(2, 6), torch.randn(2, 6, 2), 2)
    return dk.last_backends()["saccade_gather"].backend


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_backend_is_per_thread():
    """Threads each pinning a backend, thousands of calls, nested blocks exited in interleaved order:
    every call runs its own thread's backend and leaves the others' state alone."""
    kinds = ["reference", "cpp", "reference", "cpp"]
    seen = {i: set() for i in range(len(kinds))}
    start, errors = threading.Barrier(len(kinds)), []

    def worker(i):
        try:
            start.wait()
            deadline = time.monotonic() + 20
            for n in range(600):
                with dk.backend(kinds[i]):
                    seen[i].add(_saccade_backend_probe())
                    if n % 3 == 0:
                        with dk.backend("reference"):
                            assert dispatch.requested_kind() == "reference"
                        assert dispatch.requested_kind() == kinds[i]
                    seen[i].add(dispatch.requested_kind())
                assert time.monotonic() < deadline
            assert dispatch.requested_kind() == os.environ.get(dispatch.ENV_VAR, "auto")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    dk.clear_last_backends()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(kinds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, kind in enumerate(kinds):
        assert seen[i] == {kind}, (i, kind, seen[i])
    assert "saccade_gather" not in dk.last_backends()   # the workers' records are their own


def test_interleaved_exits_leave_each_thread_its_own_choice():
    """A enters, B enters, A exits while B is inside, then B exits: each sees only its own blocks
    (a shared stack popped A's entry off B's, or B's off A's)."""
    steps = [threading.Event() for _ in range(4)]
    seen, errors = {}, []

    def a():
        try:
            with dk.backend("reference"):
                steps[0].set()
                steps[1].wait(10)                    # B is inside its block
                seen["a inside"] = dispatch.requested_kind()
            seen["a after"] = dispatch.requested_kind()
            steps[2].set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def b():
        try:
            steps[0].wait(10)
            with dk.backend("cpp"):
                with dk.backend("triton-interpret"):
                    pass
                steps[1].set()
                steps[2].wait(10)                    # A has left its block
                seen["b inside"] = dispatch.requested_kind()
            seen["b after"] = dispatch.requested_kind()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (a, b)]
    with dk.backend("reference"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert dispatch.requested_kind() == "reference"
    default = os.environ.get(dispatch.ENV_VAR, "auto")
    assert not errors, errors
    assert seen == {"a inside": "reference", "a after": default, "b inside": "cpp", "b after": default}, seen


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_backend_is_per_asyncio_task():
    kinds = ["reference", "cpp", "auto"]
    expected = {"reference": "reference", "cpp": "cpp", "auto": "cpp"}   # auto on CPU: the extension first

    async def task(kind, out):
        for n in range(300):
            with dk.backend(kind):
                await asyncio.sleep(0)          # the others run while this block is open
                out.add(_saccade_backend_probe())
                await asyncio.sleep(0)
                out.add(dispatch.requested_kind())
                out.add(dk.last_backends()["saccade_gather"].backend)

    async def main():
        outs = [set() for _ in kinds]
        await asyncio.wait_for(asyncio.gather(*(task(k, o) for k, o in zip(kinds, outs))), 60)
        return outs

    with dk.backend("reference"):   # the creating context's choice is inherited, then changed per task
        outs = asyncio.run(main())
        assert dispatch.requested_kind() == "reference"
    for kind, out in zip(kinds, outs):
        assert out == {expected[kind], kind}, (kind, out)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_compiled_code_follows_the_backend_it_was_called_under():
    """A graph traced under one backend is not reused under another (dynamo guards on the choice);
    two threads calling the same compiled function under different backends each run their own."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def step(scores, features):
        gathered, positions, cu = ops.saccade_gather(scores, features, 3, order="spatial")
        return gathered * 2, positions, cu

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=capture)
    scores, features = torch.randn(2, 8), torch.randn(2, 8, 4)
    with dk.backend("cpp"):
        want = step(scores, features)
        got = compiled(scores, features)
    assert "deepencoder_kernels.saccade_gather" in graphs[-1] and ", cpp)" in graphs[-1], graphs[-1]
    assert dk.last_backends()["saccade_gather"].backend == "cpp"
    with dk.backend("reference"):
        got_ref = compiled(scores, features)
    assert len(graphs) == 2 and "deepencoder_kernels.saccade_gather" not in graphs[-1], graphs   # re-traced: plain ops
    for g, r, w in zip(got, got_ref, want):
        assert torch.equal(g, w) and torch.equal(r, w)

    results, errors = {}, []

    def worker(kind):
        try:
            with dk.backend(kind):
                for _ in range(50):
                    compiled(scores, features)
                    if kind == "cpp":
                        assert dk.last_backends()["saccade_gather"].backend == "cpp"
                results[kind] = len(graphs)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("cpp", "reference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(graphs) == 2   # both threads reused their own backend's graph: no re-trace


# ---- the CUDA extension's real host code (csrc/saccade_gather.cu), on the CPU ---------------------------
#
# tests/cuda_emulation/saccade_host_emulated.cpp compiles the launcher unchanged against a stand-in
# CUDA runtime (host memory tagged with device indexes, a current device, a log of launches) and
# the block model that runs the kernels; the Python side is the op's own run_extension.

import ctypes  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from deepencoder_kernels import reference  # noqa: E402
import importlib  # noqa: E402

sg = importlib.import_module("deepencoder_kernels.ops.saccade_gather")   # the module (ops.saccade_gather is the op)

ROOT = Path(__file__).resolve().parents[1]
STREAM = 0x5EED   # a stream handle the launcher must pass through untouched


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed (CI has it)")
    lib = tmp_path_factory.mktemp("emu") / "saccade_host_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'cuda_emulation'}",
           *os.environ.get("DEEPENCODER_KERNELS_EMULATION_FLAGS", "").split(),
           str(ROOT / "tests" / "cuda_emulation" / "saccade_host_emulated.cpp"), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    so = ctypes.CDLL(str(lib))
    c = ctypes
    so.emu_saccade_gather_cuda.restype = c.c_int
    so.emu_saccade_gather_cuda.argtypes = [c.c_void_p, c.c_int, c.c_void_p, c.c_int64, c.c_void_p, c.c_int64, c.c_int64, c.c_int64,
                                           c.c_void_p, c.c_int64, c.c_bool, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p,
                                           c.c_void_p, c.c_int]
    so.emu_register.argtypes = [c.c_size_t, c.c_uint64, c.c_int]
    so.emu_event_stream.restype = c.c_size_t
    return so


def _events(so):
    out = []
    for i in range(so.emu_event_count()):
        kind, device, blocks = ctypes.c_int(), ctypes.c_int(), ctypes.c_uint()
        so.emu_event(i, ctypes.byref(kind), ctypes.byref(device), ctypes.byref(blocks))
        out.append(("launch" if kind.value == 0 else "memset", device.value, so.emu_event_stream(i), blocks.value))
    return out


def _on_emulated_device(so, device, *elsewhere):
    """All memory counts as ``device``'s, except ``elsewhere``: tensors on the other device."""
    so.emu_reset(0, 2)
    so.emu_register(0, 2**63, device)
    for t in elsewhere:
        so.emu_register(t.data_ptr(), max(t.numel() * t.element_size(), 1), 1 - device)


def _emulated_op(so, device, scores, features, k, cu=None, spatial=False):
    launch = lambda *call: so.emu_saccade_gather_cuda(*call, STREAM, device)  # noqa: E731
    return sg.run_extension(scores, features, k, cu, spatial, launch, checks_values=False)


@pytest.mark.parametrize("spatial", [False, True])
def test_cuda_host_launcher_device_stream_and_results(host, spatial):
    lengths = [5, 0, 300, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scores, features = torch.randn(sum(lengths)).to(torch.float16), torch.randn(sum(lengths), 7).to(torch.float16)
    k = torch.tensor([5, 0, 257, 0])
    _on_emulated_device(host, 1)
    got = _emulated_op(host, 1, _strided(scores), _transposed(features), _strided(k), _strided(cu), spatial)
    _assert_same_saccade(got, reference.saccade_gather(scores, features, k, cu, spatial))
    events = _events(host)
    assert [e[0] for e in events] == ["launch", "launch"] and events[0][3] == 4
    assert all(device == 1 and stream == STREAM for _, device, stream, _ in events), events   # on the tensors' device
    assert host.emu_current_device() == 0                                                  # the caller's device back


def test_cuda_host_launcher_batched_k_zero_and_n(host):
    scores, features, k = torch.randn(3, 40), torch.randn(3, 40, 16), torch.tensor([0, 40, 13])
    _on_emulated_device(host, 0)
    _assert_same_saccade(_emulated_op(host, 0, scores, features, k), reference.saccade_gather(scores, features, k))


def test_cuda_host_launcher_no_images_writes_cu_seqlens_out(host):
    _on_emulated_device(host, 1)
    cu_out = torch.full((1,), -1, dtype=torch.int32)
    empty = torch.empty(0, dtype=torch.int64)
    status = host.emu_saccade_gather_cuda(0, 0, 0, 5, empty.data_ptr(), 0, 0, 0, 0, 12, False, 0, 0, 0, cu_out.data_ptr(), STREAM, 1)
    assert status == 0 and cu_out.tolist() == [0]
    assert _events(host) == [("memset", 1, STREAM, 0)] and host.emu_current_device() == 0
    got = _emulated_op(host, 1, torch.randn(0, 5), torch.randn(0, 5, 3), empty)
    assert got[2].tolist() == [0] and got[0].shape == (0, 3)


def test_cuda_host_launcher_refuses_mixed_devices_and_bad_device(host):
    scores, features, k = torch.randn(2, 8), torch.randn(2, 8, 4), torch.tensor([3, 1])
    for foreign in (scores, features, k):
        _on_emulated_device(host, 0, foreign)
        with pytest.raises(ValueError, match="not memory of"):
            _emulated_op(host, 0, scores, features, k)
        assert [e for e in _events(host) if e[0] == "launch"] == []     # refused before any launch
    _on_emulated_device(host, 0)
    with pytest.raises(RuntimeError, match="cudaError 101"):
        _emulated_op(host, 5, scores, features, k)                      # no such device
    assert host.emu_current_device() == 0


def test_cuda_host_checks_budgets_and_kernel_clamps_them(host):
    """The values are checked with the one host read that sizes the outputs (so also under
    torch.compile); and the kernel itself never selects past an image when handed k > N or k < 0."""
    scores, features = torch.randn(2, 8), torch.randn(2, 8, 4)
    _on_emulated_device(host, 0)
    for k in (torch.tensor([9, 1]), torch.tensor([-1, 1])):
        with pytest.raises(ValueError, match="out of range"):
            _emulated_op(host, 0, scores, features, k)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        _emulated_op(host, 0, torch.randn(8), torch.randn(8, 4), torch.tensor([1, 1]), torch.tensor([0, 3, 9], dtype=torch.int32))
    # straight to the launcher, no host checks: budgets clamped to [0, N_b]
    k = torch.tensor([9, -3])
    gathered, positions, sources = torch.empty(8, 4), torch.empty(8, dtype=torch.int64), torch.empty(8, dtype=torch.int64)
    cu_out = torch.full((3,), -1, dtype=torch.int32)
    status = host.emu_saccade_gather_cuda(scores.data_ptr(), 0, 0, 8, k.data_ptr(), 2, 16, 8, features.data_ptr(), 16, False,
                                          gathered.data_ptr(), positions.data_ptr(), sources.data_ptr(), cu_out.data_ptr(), STREAM, 0)
    want = reference.saccade_gather(scores, features, torch.tensor([8, 0]))
    assert status == 0 and cu_out.tolist() == [0, 8, 8]
    assert torch.equal(positions, want[1]) and torch.equal(gathered, want[0])


# ---- the CuPy path: its launch plan, executed by the emulated kernels ----------------------------------

from deepencoder_kernels import cupy_saccade  # noqa: E402


def _execute_plan(so, plan):
    """Run a CuPy launch plan on the emulated kernels (the CuPy launch itself needs a GPU)."""
    for step in plan:
        if step[0] == "memset":
            ctypes.memset(int(step[1]), 0, step[2])
            continue
        name, grid, block, args = step
        if name == "saccade_select":
            so.emu_launch_select(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *(ctypes.c_int64(int(a)) if isinstance(a, np.int64)
                                 else ctypes.c_int32(int(a)) if isinstance(a, np.int32) else ctypes.c_void_p(int(a)) for a in args))
        else:
            unit = int(name.rsplit("_", 1)[1])
            so.emu_launch_gather(unit, ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), ctypes.c_void_p(int(args[0])),
                                 ctypes.c_int64(int(args[1])), ctypes.c_void_p(int(args[2])), ctypes.c_int64(int(args[3])),
                                 ctypes.c_void_p(int(args[4])))
    return 0


import numpy as np  # noqa: E402


@pytest.mark.parametrize("spatial", [False, True])
def test_cupy_launch_plan_runs_the_kernels_right(host, spatial):
    """The CuPy path's host logic (the op's run_extension + launch_plan) on views, empty images,
    k = 0 and N, with its plan executed by the same kernels on the CPU."""
    lengths = [6, 0, 260, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scores, features = torch.randn(sum(lengths)).to(torch.bfloat16), torch.randn(sum(lengths), 9).to(torch.bfloat16)
    k = torch.tensor([6, 0, 200, 0])
    launch = lambda *call: _execute_plan(host, cupy_saccade.launch_plan(*call))  # noqa: E731
    got = sg.run_extension(_offset(scores), _transposed(features), _strided(k), _strided(cu), spatial,
                           launch, checks_values=False)
    _assert_same_saccade(got, reference.saccade_gather(scores, features, k, cu, spatial))
    got = sg.run_extension(torch.randn(0, 4), torch.randn(0, 4, 2), torch.zeros(0, dtype=torch.int64), None, spatial, launch,
                           checks_values=False)
    assert got[2].tolist() == [0]


def test_cupy_launch_plan_arguments():
    plan = cupy_saccade.launch_plan(0x1000, 2, 0, 300, 0x2000, 4, 1200, 3_000_000_000, 0x3008, 24, True,
                                    0x4000, 0x5000, 0x6000, 0x7000)
    (name, grid, block, args), (gname, ggrid, gblock, gargs) = plan
    assert name == "saccade_select" and grid == (4,) and block == (cupy_saccade.SELECT_THREADS,)
    assert dict(zip(cupy_saccade.SELECT_PARAMS, args)) == dict(
        scores=0x1000, score_dtype=2, cu_seqlens=0, uniform_length=300, k_per_image=0x2000, spatial_order=1,
        positions=0x5000, sources=0x6000, cu_seqlens_out=0x7000)
    widths = {p: a.dtype.itemsize for p, a in zip(cupy_saccade.SELECT_PARAMS, args)}
    assert widths == dict(scores=8, score_dtype=4, cu_seqlens=8, uniform_length=8, k_per_image=8, spatial_order=4,
                          positions=8, sources=8, cu_seqlens_out=8)
    # 3e9 rows: sizes stay 64-bit; features at 0x3008 and 24-byte rows: an 8-byte copy unit
    assert gname == "saccade_gather_rows_8" and ggrid == ((3_000_000_000 * 32 + 255) // 256,)
    assert [int(a) for a in gargs] == [0x3008, 3, 0x6000, 3_000_000_000, 0x4000] and gargs[3].dtype == np.int64
    assert cupy_saccade.launch_plan(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 0, 0, 0x7000) == [("memset", 0x7000, 4)]
    with pytest.raises(ValueError, match="grid limit"):
        cupy_saccade.launch_plan(0x1000, 0, 0, 1, 0x2000, 2**31, 2**31, 0, 0, 4, False, 0, 0, 0, 0x7000)


# ---- on a GPU (`pytest -m gpu tests/test_boundaries.py`; scripts/gpu_check.sh also runs it under compute-sanitizer) ----

def _cuda_paths():
    """(name, run) for each CUDA saccade path: the extension through the op, and the CuPy path."""
    def extension_path(scores, features, k, cu=None, order="score"):
        with dk.backend("cpp"):
            out = ops.saccade_gather(scores, features, k, cu, order=order)
        assert dk.last_backends()["saccade_gather"].backend == "cpp"
        return out

    def cupy_path(scores, features, k, cu=None, order="score"):
        pytest.importorskip("cupy", reason="CuPy is not installed (the 'cupy' extra)")
        return cupy_saccade.saccade_gather(scores, features, k, cu, order=order)
    return [("extension", extension_path), ("cupy", cupy_path)]


def _cpu_answer(scores, features, k, cu=None, order="score"):
    return _saccade("reference", scores.cpu(), features.cpu(), k.cpu() if isinstance(k, torch.Tensor) else k,
                    None if cu is None else cu.cpu(), order=order)


def _assert_same_on_cpu(got, want):
    torch.cuda.synchronize()
    _assert_same_saccade(tuple(t.cpu() for t in got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["extension", "cupy"])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_gpu_saccade_layouts(path, order):
    run = dict(_cuda_paths())[path]
    lengths = [5, 0, 700, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scores, features, k = torch.randn(706), torch.randn(706, 24).to(torch.bfloat16), torch.tensor([5, 0, 300, 1])
    want = _cpu_answer(scores, features, k, cu, order)
    for layout in VALUE_PRESERVING:
        make = LAYOUTS[layout]
        got = run(make(scores.cuda()), make(features.cuda()), _strided(k.cuda()), _strided(cu.cuda()), order)
        _assert_same_on_cpu(got, want)
    batched, feats = torch.randn(3, 50), torch.randn(3, 50, 8)
    for k in (torch.tensor([0, 50, 7]), torch.tensor(50).expand(3), torch.tensor(4).expand(3)):   # k = 0, N; stride 0
        on_gpu = k.cuda() if k.stride(0) else torch.tensor(int(k[0]), device="cuda").expand(3)
        got = run(_strided(batched.cuda()), _transposed(feats.cuda()), on_gpu, None, order)
        _assert_same_on_cpu(got, _cpu_answer(batched, feats, k.contiguous(), None, order))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["extension", "cupy"])
def test_gpu_saccade_no_images_mixed_devices_and_range(path):
    run = dict(_cuda_paths())[path]
    got = run(torch.randn(0, 5, device="cuda"), torch.randn(0, 5, 3, device="cuda"), torch.zeros(0, dtype=torch.int64, device="cuda"))
    torch.cuda.synchronize()
    assert got[2].tolist() == [0] and got[0].shape == (0, 3)
    scores, features = torch.randn(2, 8, device="cuda"), torch.randn(2, 8, 4, device="cuda")
    with pytest.raises(ValueError, match="must be on cuda|device"):
        run(scores, features.cpu(), torch.tensor([1, 1], device="cuda"))
    with pytest.raises(ValueError, match="must be on cuda|device"):
        run(scores, features, torch.tensor([1, 1]))
    for k in (torch.tensor([9, 1], device="cuda"), torch.tensor([-1, 1], device="cuda")):
        with pytest.raises(ValueError, match="out of range"):
            run(scores, features, k)


@pytest.mark.gpu
def test_gpu_saccade_range_checked_under_compile_and_called_directly():
    scores, features = torch.randn(2, 8, device="cuda"), torch.randn(2, 8, 4, device="cuda")
    bad = torch.tensor([9, 1], device="cuda")
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.deepencoder_kernels.saccade_gather(scores, features, bad, None, False, -1, "cpp")
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, f, k: ops.saccade_gather(s, f, k), fullgraph=True, backend="aot_eager")
    with dk.backend("cpp"):
        _assert_same_on_cpu(compiled(scores, features, torch.tensor([8, 0], device="cuda")),
                            _cpu_answer(scores, features, torch.tensor([8, 0])))
        with pytest.raises(ValueError, match="out of range"):
            compiled(scores, features, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["extension", "cupy"])
def test_gpu_saccade_runs_on_torchs_current_stream(path):
    """The default stream is kept busy; the op is called, and its results read back, on a side
    stream (torch's current one there): launched anywhere but that stream, the read-back would
    overtake the kernels and see unwritten outputs."""
    run = dict(_cuda_paths())[path]
    host_scores, host_features, host_k = torch.randn(4, 4096), torch.randn(4, 4096, 64), torch.tensor([100, 0, 4096, 7])
    scores, features, k = host_scores.cuda(), host_features.cuda(), host_k.cuda()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)           # on the default stream
    with torch.cuda.stream(side):
        got = tuple(t.cpu() for t in run(scores, features, k))   # .cpu() waits for the side stream only
    torch.cuda.synchronize()
    _assert_same_saccade(got, _cpu_answer(host_scores, host_features, host_k))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("path", ["extension", "cupy"])
def test_gpu_saccade_on_the_inputs_device(path):
    run = dict(_cuda_paths())[path]
    scores, features, k = torch.randn(3, 300), torch.randn(3, 300, 16), torch.tensor([0, 300, 20])
    with torch.cuda.device(0):
        got = run(scores.to("cuda:1"), features.to("cuda:1"), k.to("cuda:1"))
        assert torch.cuda.current_device() == 0 and all(t.device == torch.device("cuda:1") for t in got)
    _assert_same_on_cpu(got, _cpu_answer(scores, features, k))


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_compiled_fused_graph_in_an_asyncio_task_runs_that_tasks_backend():
    """dynamo guards on the backend per thread, not per task: while task C holds `with
    dk.backend("cpp")` open across an await, task R (inside its own `with dk.backend("reference")`)
    calling compiled code gets the graph traced for cpp; the custom op then runs the reference,
    which R asked for. (A graph traced for the reference is plain torch ops with no such hook: the
    README's caveat.)"""
    def step(scores, features):
        return ops.saccade_gather(scores, features, 3)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    scores, features = torch.randn(2, 8), torch.randn(2, 8, 4)
    with dk.backend("cpp"):
        want = compiled(scores, features)

    async def main():
        r_inside, c_inside, r_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def r():
            with dk.backend("reference"):
                r_inside.set()
                await c_inside.wait()
                dk.clear_last_backends()
                got = compiled(scores, features)
                r_done.set()
                return dk.last_backends()["saccade_gather"].backend, got

        async def c():
            await r_inside.wait()
            with dk.backend("cpp"):
                c_inside.set()
                await r_done.wait()

        return (await asyncio.wait_for(asyncio.gather(r(), c()), 60))[0]

    ran, got = asyncio.run(main())
    assert ran == "reference"
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_cupy_path_checks_what_its_docstring_promises(host):
    """The CuPy wrapper's own argument checks (CPU tensors stand in for CUDA ones), then the shared
    host path's offset checks: cu[0] == 0, cu[-1] == len(scores), feature rows == scores."""
    ops_module = sg
    check = lambda *a: cupy_saccade._checked_args(ops_module, *a)  # noqa: E731
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"features must have shape \[8, \*\]"):
        check(torch.randn(8), torch.randn(7, 4), 2, cu)
    with pytest.raises(ValueError, match=r"features must have shape \[2, 4, \*\]"):
        check(torch.randn(2, 4), torch.randn(2, 5, 3), 2, None)
    with pytest.raises(TypeError, match=r"cu_seqlens must have dtype in \['torch.int32'\]"):
        check(torch.randn(8), torch.randn(8, 4), 2, cu.long())
    with pytest.raises(ValueError, match=r"k must have shape \[2\]"):
        check(torch.randn(8), torch.randn(8, 4), torch.tensor([1, 1, 1]), cu)
    with pytest.raises(ValueError, match=r"scores must be \[B, N\] without cu_seqlens"):
        check(torch.randn(8), torch.randn(8, 4), 2, None)
    scores, features, k, cu_checked = check(_strided(torch.randn(8)), _transposed(torch.randn(8, 4)), 2, _strided(cu))
    assert all(t.is_contiguous() for t in (scores, features, k, cu_checked)) and k.tolist() == [2, 2]
    launch = lambda *call: _execute_plan(host, cupy_saccade.launch_plan(*call))  # noqa: E731
    for bad, match in (([1, 3, 8], r"cu_seqlens\[0\] must be 0"), ([0, 3, 9], r"cu_seqlens\[-1\] must equal the packed token count 8"),
                       ([0, 5, 3, 8], "non-decreasing")):
        bad_cu = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match=match):
            sg.run_extension(*check(torch.randn(8), torch.randn(8, 4), 0, bad_cu), False, launch, checks_values=False)
