"""GPU benchmark: fused rel-pos attention vs upstream's dense-bias SDPA vs FlexAttention (score_mod).

    pytest benchmarks/bench_rel_pos_attention.py --benchmark-json benchmarks/results/rel_pos_attention_<gpu>.json

Per mode (tiny/small/base/large), block type (windowed/global), batch 1 and 32, bf16. Each case
records time, achieved TFLOP/s and the fraction of the device's dense bf16 peak in extra_info.
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
