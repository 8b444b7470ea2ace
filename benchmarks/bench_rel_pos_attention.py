"""GPU benchmark: fused rel-pos attention vs upstream's dense-bias SDPA vs FlexAttention (score_mod).

    pytest benchmarks/bench_rel_pos_attention.py --benchmark-json benchmarks/results/rel_pos_attention_<gpu>.json

Per mode (tiny/small/base/large), block type (windowed/global), batch 1 and 32, bf16. Each case
records time, achieved TFLOP/s and the fraction of the device's dense bf16 peak in extra_info.
``test_rel_pos_attention_forward_backward``: the same three as a training step (forward + backward
into qkv, both tables and pad_kv), batch 1 and 8.
Skips, saying why, on a machine without a CUDA device (these machines time nothing they cannot run).
"""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels.ops.rel_pos_attention import flops
from common import MODES, attention_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA device on this machine")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flex_attention_fn(qkv, th, tw, heads, window, pad):
    """FlexAttention with the decomposed bias as a score_mod (global blocks; windows need partitioning)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, W, C3 = qkv.shape
    q, k, v = qkv.view(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
    Rh = dk.reference.rel_pos_lookup(H, th)   # [H, H, d]
    Rw = dk.reference.rel_pos_lookup(W, tw)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q.view(B, heads, H, W, -1), Rh).reshape(B, heads, H * W, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q.view(B, heads, H, W, -1), Rw).reshape(B, heads, H * W, W)

    def score_mod(score, b, h, qi, ki):
        return score + rel_h[b, h, qi, ki // W] + rel_w[b, h, qi, ki % W]

    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, score_mod=score_mod)


IMPLS = ["fused", "dense_sdpa", "flex"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("block", ["windowed", "global"])
@pytest.mark.parametrize("mode", list(MODES))
def test_rel_pos_attention(benchmark, mode, block, batch, impl):
    args = attention_inputs(mode, block, batch, torch.bfloat16, "cuda")
    if impl == "fused":
        def fn():
            with dk.backend("triton"):
                return dk.ops.rel_pos_attention(*args)
    elif impl == "dense_sdpa":
        fn = lambda: dk.reference.rel_pos_attention(*args)  # noqa: E731
    else:
        if block == "windowed":
            pytest.skip("FlexAttention comparison is for global blocks (windows need a partition copy first)")
        fn = flex_attention_fn(*args)
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=20, warmup_rounds=3)
    f = flops(tuple(args[0].shape), args[3], args[4])
    tflops = f / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), gflop=f / 1e9, tflops=tflops,
                                fraction_of_peak=(tflops / peak_tflops()) if peak_tflops() else None)


def flex_attention_train_fn(qkv, th, tw, heads, window, pad):
    """FlexAttention forward + backward (global blocks): the bias built from q inside, so gradients reach q and the tables."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    B, H, W, C3 = qkv.shape

    def run():
        q, k, v = qkv.view(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q.view(B, heads, H, W, -1), dk.reference.rel_pos_lookup(H, th)).reshape(B, heads, H * W, H)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q.view(B, heads, H, W, -1), dk.reference.rel_pos_lookup(W, tw)).reshape(B, heads, H * W, W)

        def score_mod(score, b, h, qi, ki):
            return score + rel_h[b, h, qi, ki // W] + rel_w[b, h, qi, ki % W]

        return compiled(q, k, v, score_mod=score_mod)

    return run


def reference_saved_bytes(qkv_shape, heads: int, window: int) -> int:
    """What the dense-bias reference keeps for the backward, roughly (bias, probabilities, scores in bf16)."""
    B, H, W, _ = qkv_shape
    if window:
        seqs, n = B * -(-H // window) * -(-W // window), window * window
    else:
        seqs, n = B, H * W
    return 3 * seqs * heads * n * n * 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("block", ["windowed", "global"])
@pytest.mark.parametrize("mode", list(MODES))
def test_rel_pos_attention_forward_backward(benchmark, mode, block, batch, impl):
    """A training step of the attention core: forward, then backward into qkv, both tables and pad_kv."""
    args = attention_inputs(mode, block, batch, torch.bfloat16, "cuda")
    qkv, th, tw, heads, window, pad = args
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    if impl == "fused":
        def forward():
            with dk.backend("triton"):
                return dk.ops.rel_pos_attention(*leaves)
    elif impl == "dense_sdpa":
        if reference_saved_bytes(qkv.shape, heads, window) > 0.6 * torch.cuda.get_device_properties(0).total_memory:
            pytest.skip("the dense-bias reference would not fit this GPU's memory for a training step")
        forward = lambda: dk.reference.rel_pos_attention(*leaves)  # noqa: E731
    else:
        if block == "windowed":
            pytest.skip("FlexAttention comparison is for global blocks (windows need a partition copy first)")
        forward = flex_attention_train_fn(*leaves)
    grad = torch.randn(qkv.shape[:3] + (qkv.shape[3] // 3,), device="cuda", dtype=torch.bfloat16)
    if impl == "flex":
        grad = grad.view(batch, -1, heads, qkv.shape[3] // 3 // heads).transpose(1, 2)

    def step():
        forward().backward(grad)
        torch.cuda.synchronize()

    step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    f = 3 * flops(tuple(qkv.shape), heads, window)   # forward + the gradients' matmuls (2x), recomputation not counted
    tflops = f / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), gflop_fwd_bwd=f / 1e9, tflops=tflops,
                                fraction_of_peak=(tflops / peak_tflops()) if peak_tflops() else None,
                                last_backend=str(dk.last_backends().get("rel_pos_attention")) if impl == "fused" else None)
