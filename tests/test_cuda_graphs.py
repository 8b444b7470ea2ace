"""CUDA-graph capture and replay (`pytest -m gpu`): every op on its fused CUDA backend (forward, and a
training step through the fused backward), the packed encoder and an accelerate()d model are captured with ``torch.cuda.graph`` after a warm-up (Triton's
JIT, the tables resized per parameter and the batch's packing are made there), replayed, and the
replay equals eager on the same inputs; then new values are copied into the captured inputs (other
pixels; for the varlen op other lengths and grids of the same shapes and bounds) and the replay equals
eager on those. What makes this possible on the CPU side is checked by test_host_sync.py."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import ops
from deepencoder_kernels.preprocess import Views
from conftest import assert_close, small_encoder

pytestmark = pytest.mark.gpu


def capture(fn):
    """Warm up on a side stream (as torch's CUDA-graph notes ask), then capture one call of ``fn``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_equals_eager(fn, inputs, refill, dtype, grad=False, backend="triton"):
    """Capture ``fn()`` (reading ``inputs``), replay, compare with eager; ``refill()`` writes new values into
    ``inputs`` in place; replay again and compare with eager on the new values."""
    with torch.set_grad_enabled(grad), dk.backend(backend):
        graph, out = capture(fn)
        for round_ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            want = fn()
            outs, wants = (out, want) if isinstance(out, (list, tuple)) else ([out], [want])
            for o, w in zip(outs, wants):
                assert o.shape == w.shape
                assert_close(o, w, dtype, msg=f"replay {round_}")
            if round_ == 0:
                refill()


def refill_randn(*tensors):
    def refill():
        for t in tensors:
            t.copy_(torch.randn_like(t) * 0.5)
    return refill


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window,side", [(14, 64), (0, 64), (14, 40), (0, 40)])
def test_rel_pos_attention(window, side, dtype):
    qkv = (torch.randn(2, side, side, 3 * 768, device="cuda") * 0.5).to(dtype)
    th, tw = ((torch.randn(2 * (window or 64) - 1, 64, device="cuda") * 0.3).to(dtype) for _ in range(2))
    pad = (torch.randn(3 * 768, device="cuda") * 0.5).to(dtype) if window else None
    replay_equals_eager(lambda: ops.rel_pos_attention(qkv, th, tw, 12, window, pad), [qkv], refill_randn(qkv), dtype)


@pytest.mark.parametrize("order", ["score", "spatial"])
def test_saccade_gather_int_budget(order):
    """An int budget over [B, N] inputs: the output size is known on the host, so the CUDA op captures."""
    scores = torch.randn(8, 4096, device="cuda")
    features = torch.randn(8, 4096, 768, device="cuda", dtype=torch.bfloat16)
    replay_equals_eager(lambda: ops.saccade_gather(scores, features, 273, order=order), [scores], refill_randn(scores),
                        torch.float32, backend="cpp")


def test_saccade_gather_tensor_budget_is_refused_while_capturing():
    scores, features = torch.randn(2, 256, device="cuda"), torch.randn(2, 256, 64, device="cuda")
    k = torch.tensor([3, 5], device="cuda")
    ops.saccade_gather(scores, features, k)   # eager: fine
    with dk.backend("cpp"), pytest.raises(ValueError, match="pass k as an int"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ops.saccade_gather(scores, features, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compress(dtype):
    x = torch.randn(2, 64, 64, 768, device="cuda").to(dtype)
    ws = [torch.randn(256, 768, 1, 1) / 768 ** 0.5, 1 + 0.1 * torch.randn(256), 0.1 * torch.randn(256),
          torch.randn(256, 256, 3, 3) / 48, 1 + 0.1 * torch.randn(256), 0.1 * torch.randn(256),
          torch.randn(512, 256, 3, 3) / 48, torch.randn(1024, 512, 3, 3) / 68]
    ws = [w.to("cuda", dtype) for w in ws]
    replay_equals_eager(lambda: ops.compress(x, *ws, eps=1e-6), [x], refill_randn(x), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("check_values", [False, True], ids=["unchecked", "default-checks-skipped-while-capturing"])
def test_varlen_attention_plain_other_lengths_on_replay(check_values, dtype):
    """CLIP-like packed sequences; the replay runs other lengths (same total, same max_seqlen)."""
    lengths, other = [65, 101, 257, 401, 64], [401, 1, 300, 86, 100]
    total, max_seqlen = sum(lengths), 401
    assert sum(other) == total and max(other) <= max_seqlen
    qkv = (torch.randn(total, 3, 16, 64, device="cuda") * 0.5).to(dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    new_cu = torch.tensor([0, *torch.tensor(other).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    def refill():
        qkv.copy_(torch.randn_like(qkv) * 0.5)
        cu.copy_(new_cu)

    replay_equals_eager(lambda: ops.varlen_attention(q, k, v, cu, max_seqlen, check_values=check_values), [qkv], refill, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_attention_rel_pos_other_grids_on_replay(dtype):
    """Packed SAM-global grids with max_side from the host; the replay runs other grids of the same count,
    total and bound (the tables cover every side up to max_side, the first rows are computed on the device)."""
    grids, other = [(32, 32), (40, 40), (64, 64), (40, 40)], [(40, 40), (64, 64), (32, 32), (40, 40)]
    lengths = [h * w for h, w in grids]
    total = sum(lengths)
    qkv = (torch.randn(total, 3, 12, 64, device="cuda") * 0.5).to(dtype)
    q, k, v = qkv.unbind(1)
    cu_of = lambda gs: torch.tensor([0, *torch.tensor([h * w for h, w in gs]).cumsum(0).tolist()], dtype=torch.int32, device="cuda")  # noqa: E731
    cu, grid_hw = cu_of(grids), torch.tensor(grids, dtype=torch.int32, device="cuda")
    th, tw = ((torch.randn(127, 64, device="cuda") * 0.3).to(dtype) for _ in range(2))
    new_cu, new_grid = cu_of(other), torch.tensor(other, dtype=torch.int32, device="cuda")

    def refill():
        qkv.copy_(torch.randn_like(qkv) * 0.5)
        cu.copy_(new_cu)
        grid_hw.copy_(new_grid)

    replay_equals_eager(lambda: ops.varlen_attention(q, k, v, cu, 4096, rel_pos_h=th, rel_pos_w=tw, grid_hw=grid_hw,
                                                     check_values=False, max_side=64), [qkv], refill, dtype)


def causal_flow_inputs(ns, dtype, grad=False):
    """DeepEncoder V2's causal-flow attention inputs at the real shapes: views [n image tokens; n
    queries], 14 query heads, 2 kv heads, d 64, RoPE tables, prefix_lens = n."""
    from deepencoder_kernels.reference import rope_tables

    lengths = [2 * n for n in ns]
    total = sum(lengths)
    q = (torch.randn(total, 14, 64, device="cuda") * 0.5).to(dtype).requires_grad_(grad)
    k, v = ((torch.randn(total, 2, 64, device="cuda") * 0.5).to(dtype).requires_grad_(grad) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    prefix = torch.tensor(ns, dtype=torch.int32, device="cuda")
    cos, sin = rope_tables(512, 64, 1e6, dtype, "cuda")
    return q, k, v, cu, prefix, cos, sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_attention_prefix_gqa_rope_other_views_on_replay(dtype):
    """A 6-tile page (6 x 288 + 512); the replay runs another page layout of the same token budget and
    bound (other lengths and prefixes)."""
    ns, other = [144] * 6 + [256], [256, 144, 144, 144, 144, 144, 144]
    q, k, v, cu, prefix, cos, sin = causal_flow_inputs(ns, dtype)
    new_cu = torch.tensor([0, *torch.tensor([2 * n for n in other]).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    new_prefix = torch.tensor(other, dtype=torch.int32, device="cuda")

    def refill():
        for t in (q, k, v):
            t.copy_(torch.randn_like(t) * 0.5)
        cu.copy_(new_cu)
        prefix.copy_(new_prefix)

    replay_equals_eager(lambda: ops.varlen_attention(q, k, v, cu, 512, prefix_lens=prefix, rope_cos=cos, rope_sin=sin),
                        [q, k, v], refill, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_attention_prefix_gqa_rope_training_step(dtype):
    q, k, v, cu, prefix, cos, sin = causal_flow_inputs([144, 144, 256], dtype, grad=True)
    step = training_step(lambda: ops.varlen_attention(q, k, v, cu, 512, prefix_lens=prefix, rope_cos=cos, rope_sin=sin,
                                                      check_values=False), [q, k, v])

    def refill():
        for t in (q, k, v):
            t.data.copy_(torch.randn_like(t) * 0.5)

    replay_equals_eager(step, [q, k, v], refill, dtype, grad=True)


def test_varlen_without_max_side_is_refused_while_capturing():
    q = torch.randn(16, 2, 32, device="cuda")
    cu = torch.tensor([0, 16], dtype=torch.int32, device="cuda")
    t = torch.randn(7, 32, device="cuda")
    grid = torch.tensor([[4, 4]], dtype=torch.int32, device="cuda")
    with dk.backend("triton"):
        ops.varlen_attention(q, q, q, cu, 16, rel_pos_h=t, rel_pos_w=t, grid_hw=grid)   # warm-up (eager: reads grid_hw)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match="max_side"), torch.cuda.graph(graph):
            ops.varlen_attention(q, q, q, cu, 16, rel_pos_h=t, rel_pos_w=t, grid_hw=grid)


@pytest.mark.parametrize("full_size", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["small", "full-size-bf16"])
def test_packed_encoder(full_size):
    """A mixed batch (Tiny, Small and Base globals, two Small tiles; small model: 128 / 192 px views),
    captured whole: windowed groups, packed global blocks, packed CLIP, projector, layout."""
    if full_size:
        from deepencoder_kernels.profiler import random_encoder

        enc, dtype, sides, tile = random_encoder(dtype=torch.bfloat16, device="cuda"), torch.bfloat16, (512, 640, 1024), 640
    else:
        enc, dtype, sides, tile = small_encoder().cuda(), torch.float32, (128, 192, 128), 128
    px = lambda s: (torch.rand(3, s, s, device="cuda") * 2 - 1).to(dtype)  # noqa: E731
    views = [Views(px(sides[0]), None), Views(px(sides[1]), None), Views(px(sides[2]), torch.stack([px(tile), px(tile)]), (2, 1))]
    pixels = [v.global_view for v in views] + [views[2].tiles]

    def refill():
        for p in pixels:
            p.copy_(torch.rand_like(p) * 2 - 1)

    replay_equals_eager(lambda: enc.encode_views_packed(views), pixels, refill, dtype)


def test_accelerated_model():
    """DeepSeek's module layout (upstream-structured stand-in) after accelerate(), captured whole."""
    from test_accelerate import randomised
    from upstream import UpstreamDeepEncoder

    model = randomised(UpstreamDeepEncoder()).cuda()
    dk.accelerate(model)
    pixels = torch.randn(2, 3, 128, 128, device="cuda")
    replay_equals_eager(lambda: model(pixels), [pixels], refill_randn(pixels), torch.float32)


def training_step(fn, leaves):
    """Forward + backward (the fused backward kernels); returns the leaves' gradients (made anew each call,
    so a captured step owns its gradient tensors)."""
    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out) * 0.1)
        return [t.grad for t in leaves]
    return step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [14, 0])
def test_rel_pos_attention_training_step(window, dtype):
    qkv = (torch.randn(2, 40, 40, 3 * 768, device="cuda") * 0.5).to(dtype).requires_grad_(True)
    th, tw = ((torch.randn(2 * (window or 40) - 1, 64, device="cuda") * 0.3).to(dtype).requires_grad_(True) for _ in range(2))
    step = training_step(lambda: ops.rel_pos_attention(qkv, th, tw, 12, window), [qkv, th, tw])
    replay_equals_eager(step, [qkv], lambda: qkv.data.copy_(torch.randn_like(qkv) * 0.5), dtype, grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_attention_training_step_with_rel_pos(dtype):
    grids = [(32, 32), (40, 40), (16, 16)]
    total = sum(h * w for h, w in grids)
    qkv = (torch.randn(total, 3, 12, 64, device="cuda") * 0.5).to(dtype).requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor([h * w for h, w in grids]).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    grid_hw = torch.tensor(grids, dtype=torch.int32, device="cuda")
    th, tw = ((torch.randn(127, 64, device="cuda") * 0.3).to(dtype).requires_grad_(True) for _ in range(2))
    step = training_step(lambda: ops.varlen_attention(*qkv.unbind(1), cu, 1600, rel_pos_h=th, rel_pos_w=tw, grid_hw=grid_hw,
                                                      check_values=False, max_side=40), [qkv, th, tw])
    replay_equals_eager(step, [qkv], lambda: qkv.data.copy_(torch.randn_like(qkv) * 0.5), dtype, grad=True)


def test_compress_training_step():
    x = torch.randn(2, 40, 40, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(256, 768, 1, 1) / 768 ** 0.5, 1 + 0.1 * torch.randn(256), 0.1 * torch.randn(256),
          torch.randn(256, 256, 3, 3) / 48, 1 + 0.1 * torch.randn(256), 0.1 * torch.randn(256),
          torch.randn(512, 256, 3, 3) / 48, torch.randn(1024, 512, 3, 3) / 68]
    ws = [w.to("cuda", torch.bfloat16).requires_grad_(True) for w in ws]
    step = training_step(lambda: ops.compress(x, *ws, eps=1e-6), [x, *ws])
    replay_equals_eager(step, [x], lambda: x.data.copy_(torch.randn_like(x)), torch.bfloat16, grad=True)
