"""No host reads in the forward of any op (on its fused and C++ backends), in the fused backwards, nor
in the encoder's forward, single view and packed: what a CUDA graph needs (vLLM captures the vision encoder per token budget). A
dispatch mode fails on every op that reads device values to the host or sizes an output by data
(``_local_scalar_dense`` behind ``.item()``/``int()``/``bool()``, ``nonzero``, ``masked_select``,
boolean indexing, ``unique``, ...), ``Tensor.tolist``/``.numpy()`` (which bypass dispatch) are
patched to fail too, and host data uploaded inside the forward (``torch.tensor(list)``) fails as well
(a captured graph would replay the capture's values). The Triton interpreter's own launch reads
memory by design (on a GPU the launch is asynchronous): the check pauses inside it only."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deepencoder_kernels as dk
from deepencoder_kernels import ops
from deepencoder_kernels.preprocess import Views
from conftest import assert_close, small_encoder

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique,
              aten._unique2, aten.unique_dim, aten.equal, aten.allclose, aten.is_nonzero, aten.lift_fresh, aten.lift_fresh_copy}
DATA_SIZED = {aten.repeat_interleave: "output_size"}   # data-sized unless the size is given


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on any host read or data-sized allocation while active."""

    def __init__(self):
        super().__init__()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            packet = func.overloadpacket
            if packet in HOST_READS:
                raise HostSyncError(f"host read: {func}")
            if packet in DATA_SIZED and kwargs.get(DATA_SIZED[packet]) is None:
                raise HostSyncError(f"output sized by data: {func} without {DATA_SIZED[packet]}")
            if packet is aten.index and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                raise HostSyncError(f"boolean indexing (sized by data): {func}")
        if func.namespace == "deepencoder_kernels":
            # the package's custom ops (forward, training and backward ops): run their Python
            # implementation under the check too (the mode is off inside its own handler)
            from torch._library.custom_ops import _maybe_get_opdef

            with self:
                return _maybe_get_opdef(func._schema.name)._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    from triton.runtime.interpreter import GridExecutor

    mode = NoHostSync()
    launch = GridExecutor.__call__

    def interpreted_launch(self, *args, **kwargs):   # the interpreter runs the kernel on host memory
        mode.paused += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if not mode.paused:
                raise HostSyncError(f"host read: Tensor.{name}()")
            return original(self, *args, **kwargs)
        return original, method

    patched = {name: refuse(name) for name in ("tolist", "numpy", "__array__")}
    GridExecutor.__call__ = interpreted_launch
    for name, (_, method) in patched.items():
        setattr(torch.Tensor, name, method)
    try:
        with mode:
            yield mode
    finally:
        GridExecutor.__call__ = launch
        for name, (original, _) in patched.items():
            setattr(torch.Tensor, name, original)


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def forward_without_sync(fn, *args, backend="triton-interpret", **kwargs):
    """``fn`` once to warm its caches (tables resized per parameter, as before a capture), then under the check."""
    dk.clear_last_backends()
    with torch.no_grad(), dk.backend(backend):
        want = fn(*args, **kwargs)
        with no_host_sync():
            got = fn(*args, **kwargs)
    return got, want


# ---- the checker itself ----------------------------------------------------------------------

@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: int(t[0]), lambda t: bool(t.any()), lambda t: t.tolist(),
                                  lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: torch.tensor([1, 2]),
                                  lambda t: t.numpy(), lambda t: torch.repeat_interleave(t.abs().long())],
                         ids=["item", "int", "bool", "tolist", "nonzero", "bool-index", "upload", "numpy", "repeat_interleave"])
def test_checker_catches_every_kind_of_host_read(read):
    t = torch.randn(4)
    with pytest.raises(HostSyncError), no_host_sync():
        read(t)
    read(t)   # and is gone after the block


def test_checker_passes_device_only_work():
    t = torch.randn(4, 4)
    with no_host_sync():
        (t @ t).softmax(-1).topk(2)
        torch.repeat_interleave(torch.arange(3), 2)
        torch.arange(5)


# ---- every op --------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [0, 4])
def test_rel_pos_attention(window):
    qkv = torch.randn(2, 9, 9, 3 * 64)
    tables = [torch.randn(2 * (window or 9) - 1, 32) for _ in range(2)]
    got, want = forward_without_sync(ops.rel_pos_attention, qkv, *tables, 2, window, torch.randn(3 * 64))
    assert torch.equal(got, want)


def test_compress():
    ws = [torch.randn(16, 24, 1, 1), torch.ones(16), torch.zeros(16), torch.randn(16, 16, 3, 3), torch.ones(16),
          torch.zeros(16), torch.randn(32, 16, 3, 3), torch.randn(64, 32, 3, 3)]
    got, want = forward_without_sync(ops.compress, torch.randn(2, 7, 9, 24), *ws, eps=1e-6)
    assert torch.equal(got, want)


def test_varlen_attention_plain():
    lengths = [5, 17, 0, 9]
    q, k, v = torch.randn(3, sum(lengths), 2, 32).unbind(0)
    got, want = forward_without_sync(ops.varlen_attention, q, k, v, cu_of(lengths), 17, check_values=False)
    assert torch.equal(got, want)


def test_varlen_attention_rel_pos_with_max_side():
    grids = [(3, 3), (4, 5), (2, 2)]
    lengths = [h * w for h, w in grids]
    q, k, v = torch.randn(3, sum(lengths), 2, 32).unbind(0)
    bias = dict(rel_pos_h=torch.randn(9, 32), rel_pos_w=torch.randn(9, 32), grid_hw=torch.tensor(grids, dtype=torch.int32))
    got, want = forward_without_sync(ops.varlen_attention, q, k, v, cu_of(lengths), 20, check_values=False, max_side=5, **bias)
    assert torch.equal(got, want)


def test_varlen_tables_for_max_side_serve_other_grids():
    """What a replay with other grids relies on: tables made for max_side, then grids that differ in
    values only (same shapes, same max_side), right answers with no host read."""
    tables = [torch.randn(19, 32) * 0.3 for _ in range(2)]
    for grids in ([(3, 3), (4, 5), (2, 2)], [(5, 4), (1, 1), (4, 3)]):
        lengths = [h * w for h, w in grids]
        q, k, v = torch.randn(3, sum(lengths), 2, 32).unbind(0)
        args = (q, k, v, cu_of(lengths), 20)
        bias = dict(rel_pos_h=tables[0], rel_pos_w=tables[1], grid_hw=torch.tensor(grids, dtype=torch.int32))
        with torch.no_grad(), dk.backend("triton-interpret"), no_host_sync():
            got = ops.varlen_attention(*args, check_values=False, max_side=5, **bias)
        with dk.backend("reference"):
            assert_close(got, ops.varlen_attention(*args, **bias), torch.float32)


def backward_without_sync(fn, inputs, *args, **kwargs):
    """Forward + backward of ``fn`` on the fused backend, after a warm-up, under the check; the
    gradients equal the warm-up's (same kernels, same inputs)."""
    grads = []
    for check in (False, True):
        for t in inputs:
            t.grad = None
        with dk.backend("triton-interpret"), (no_host_sync() if check else contextlib.nullcontext()):
            out = fn(*args, **kwargs)
            out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in inputs])
    assert [dk.last_backends()[name].backend for name in dk.last_backends()] == ["triton-interpret"]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [0, 4])
def test_rel_pos_attention_backward(window):
    qkv = torch.randn(1, 9, 9, 3 * 64, requires_grad=True)
    tables = [torch.randn(2 * (window or 9) - 1, 32, requires_grad=True) for _ in range(2)]
    dk.clear_last_backends()
    backward_without_sync(ops.rel_pos_attention, [qkv, *tables], qkv, *tables, 2, window)


def test_varlen_attention_backward_with_rel_pos():
    grids = [(3, 3), (4, 5), (2, 2)]
    lengths = [h * w for h, w in grids]
    qkv = torch.randn(sum(lengths), 3, 2, 32, requires_grad=True)
    tables = [torch.randn(9, 32, requires_grad=True) for _ in range(2)]
    cu, grid_hw = cu_of(lengths), torch.tensor(grids, dtype=torch.int32)
    dk.clear_last_backends()
    backward_without_sync(lambda: ops.varlen_attention(*qkv.unbind(1), cu, 20, rel_pos_h=tables[0], rel_pos_w=tables[1],
                                                       grid_hw=grid_hw, check_values=False, max_side=5), [qkv, *tables])


def prefix_gqa_rope_inputs():
    """DeepEncoder V2's call in small: two views [n image tokens; n queries] (n = 5, 9), GQA 4/2, RoPE."""
    from deepencoder_kernels.reference import rope_tables

    lengths = [10, 18]
    q = torch.randn(sum(lengths), 4, 16)
    k, v = torch.randn(2, sum(lengths), 2, 16).unbind(0)
    cos, sin = rope_tables(18, 16, 1e6, torch.float32)
    extra = dict(prefix_lens=torch.tensor([5, 9], dtype=torch.int32), rope_cos=cos, rope_sin=sin, check_values=False)
    return (q, k, v, cu_of(lengths), 18), extra


def test_varlen_attention_prefix_gqa_rope():
    args, extra = prefix_gqa_rope_inputs()
    got, want = forward_without_sync(ops.varlen_attention, *args, **extra)
    assert torch.equal(got, want)
    assert dk.last_backends()["varlen_attention"].backend == "triton-interpret"


def test_varlen_attention_backward_prefix_gqa_rope():
    (q, k, v, cu, max_seqlen), extra = prefix_gqa_rope_inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dk.clear_last_backends()
    backward_without_sync(lambda: ops.varlen_attention(q, k, v, cu, max_seqlen, **extra), [q, k, v])


def test_compress_backward():
    x = torch.randn(1, 7, 9, 24, requires_grad=True)
    ws = [torch.randn(16, 24, 1, 1), torch.ones(16), torch.zeros(16), torch.randn(16, 16, 3, 3), torch.ones(16),
          torch.zeros(16), torch.randn(32, 16, 3, 3), torch.randn(64, 32, 3, 3)]
    ws = [w.requires_grad_(True) for w in ws]
    dk.clear_last_backends()
    backward_without_sync(ops.compress, [x, *ws], x, *ws, eps=1e-6)


def test_saccade_gather_cpp_int_budget():
    # an int k over [B, N] inputs: the output size B * k is known on the host, nothing is read back
    got, want = forward_without_sync(ops.saccade_gather, torch.randn(2, 50), torch.randn(2, 50, 8), 5, backend="cpp")
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.xfail(strict=True, raises=HostSyncError, reason="a tensor k sizes the output by sum(k), a device value read "
                   "to the host (documented; refused while a CUDA graph captures)")
def test_saccade_gather_cpp_tensor_budget():
    forward_without_sync(ops.saccade_gather, torch.randn(2, 50), torch.randn(2, 50, 8), torch.tensor([5, 3]), backend="cpp")


# ---- the encoder -----------------------------------------------------------------------------

def test_encoder_single_view():
    enc = small_encoder()
    got, want = forward_without_sync(enc.encode_pixels, torch.rand(2, 3, 128, 128) * 2 - 1)
    assert torch.equal(got, want)
    assert {op: c.backend for op, c in dk.last_backends().items()} == dict.fromkeys(
        ("rel_pos_attention", "compress", "varlen_attention"), "triton-interpret")


def test_encoder_packed_mixed_sizes():
    """Three sizes (global blocks packed over grids 8 / 12 / 8, tiles included), after one warm-up."""
    enc = small_encoder()
    px = lambda s: torch.rand(3, s, s) * 2 - 1  # noqa: E731
    views = [Views(px(128), None), Views(px(192), torch.stack([px(128), px(128)]), (2, 1))]
    got, want = forward_without_sync(enc.encode_views_packed, views)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert dk.last_backends()["varlen_attention"].backend == "triton-interpret"


def test_encoder_v2_packed_pages_on_the_reference():
    """DeepEncoder V2's packed pass (768 tiles and 1024 global views; causal-flow sequences of 288 and
    512 in one prefix-LM call) reads nothing to the host even on the reference backend: the padded
    prefix-LM mask and the row gather come from device tensors and host ints."""
    from conftest import small_encoder_v2

    enc = small_encoder_v2()
    px = lambda s: torch.rand(3, s, s) * 2 - 1  # noqa: E731
    views = [Views(px(1024), None), Views(px(1024), torch.stack([px(768), px(768)]), (2, 1))]
    got, want = forward_without_sync(enc.encode_views_packed, views, backend="reference")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert [g.shape[0] for g in got] == [257, 545]
    assert dk.last_backends()["varlen_attention"].backend == "reference"


# ---- a planted sync is caught ----------------------------------------------------------------

def test_planted_grid_read_in_the_packed_path_is_caught(monkeypatch):
    """The packed rel-pos path as it was (grid_hw read to the host to size the tables) fails the check."""
    import importlib

    varlen = importlib.import_module("deepencoder_kernels.ops.varlen_attention")
    honest = varlen.packed_bias_tables

    def reads_grids(rel_pos_h, rel_pos_w, grid_hw, max_side):
        return honest(rel_pos_h, rel_pos_w, grid_hw, max(max(g) for g in grid_hw.tolist()))

    monkeypatch.setattr(varlen, "packed_bias_tables", reads_grids)
    enc = small_encoder()
    views = [Views(torch.rand(3, 128, 128), None), Views(torch.rand(3, 192, 192), None)]
    with pytest.raises(HostSyncError, match="tolist"):
        forward_without_sync(enc.encode_views_packed, views)


def test_planted_item_in_a_launcher_is_caught(monkeypatch):
    """A value read planted in the compressor's launcher (an overflow guard, say) fails the encoder's check."""
    from deepencoder_kernels.kernels import compress

    honest = compress.compress_fwd

    def reads_a_value(x, *rest, **kwargs):
        if float(x.abs().max()) > 1e9:
            raise ValueError("overflow")
        return honest(x, *rest, **kwargs)

    monkeypatch.setattr(compress, "compress_fwd", reads_a_value)
    with pytest.raises(HostSyncError, match="aten.item|_local_scalar_dense"):
        test_encoder_single_view()


def test_value_checks_read_and_say_so():
    """The public default (check_values=True) reads cu_seqlens: callers that capture pass False, or
    capture (then the checks are skipped)."""
    lengths = [5, 7]
    q = torch.randn(12, 2, 32)
    with pytest.raises(HostSyncError), dk.backend("triton-interpret"), no_host_sync():
        ops.varlen_attention(q, q, q, cu_of(lengths), 7)


def test_planted_read_in_a_backward_is_caught():
    """The check covers the autograd engine's backward pass (the backward kernels' launchers included)."""
    x = torch.randn(3, requires_grad=True)
    y = (x * 2).sum()
    x.register_hook(lambda g: g + g.sum().item())
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), no_host_sync():
        y.backward()
