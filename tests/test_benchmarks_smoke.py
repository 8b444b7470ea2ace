"""The GPU benchmarks' code, run once on the CPU (interpreted kernels, one call per "timing"), so
that code no GPU has executed yet is at least known to run. No figures are produced or checked."""
import sys
from pathlib import Path

import torch
from PIL import Image

import deepencoder_kernels as dk
from conftest import assert_close, small_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import GpuRun  # noqa: E402

ONE_CALL = GpuRun(device="cpu", fused="triton-interpret", timer=lambda fn: (fn(), 1.0)[1], compile_backend="eager")
REFERENCE = GpuRun(device="cpu", fused="reference", timer=ONE_CALL.timer, compile_backend="eager")  # the kernels: tested elsewhere


def test_packed_benchmark_gpu_paths():
    import bench_packed

    rows = bench_packed.attention_rows([5, 17, 3], ONE_CALL, heads=2, d=32)
    assert {"varlen (this package)", "padded SDPA + key mask", "nested-tensor SDPA"} <= {r["impl"] for r in rows}
    views = [(m, dk.preprocess(Image.new("RGB", (600, 500), "white"), m)) for m in ("tiny", "small")]
    rows = bench_packed.encoder_rows(views, REFERENCE, enc=small_encoder())
    assert [r["impl"] for r in rows] == ["per-image loop", "packed batch"]


def test_compress_benchmark_gpu_paths():
    import bench_compress

    rows = bench_compress.gpu_rows(REFERENCE, modes=("tiny",), batches=(1,))
    assert [r["impl"] for r in rows] == ["PyTorch NCHW", "PyTorch channels-last", "torch.compile", "fused (this package)",
                                         "fwd+bwd PyTorch NCHW", "fwd+bwd fused (this package)"]


def test_end_to_end_benchmark_gpu_paths():
    import bench_end_to_end
    from conftest import small_encoder_v2

    rows = bench_end_to_end.rows(ONE_CALL, enc=small_encoder(), modes=("tiny",), fused="reference")  # the kernels: tested elsewhere
    assert [r["impl"] for r in rows] == ["upstream's computation (reference)", "this package"]
    assert rows[0]["tokens"] == 8 * (8 + 1) + 1 and rows[0]["views"] == 1 and rows[0]["max_abs_diff"] == 0
    assert "rel_pos_attention reference" in rows[1]["backends"]
    rows = bench_end_to_end.rows(ONE_CALL, enc=small_encoder_v2(), modes=("base",), model="v2", fused="reference")
    assert [(r["model"], r["mode"], r["views"], r["tokens"]) for r in rows] == [("v2", "base", 1, 257)] * 2


def test_causal_flow_benchmark_gpu_paths():
    """Every implementation of the causal-flow benchmark runs and computes the same attention as the
    package (tiny views: 2 query heads per kv head, d = 16; FlexAttention eager on the CPU)."""
    import bench_causal_flow as b

    p = b.problem([3, 5, 3], heads=4, kv_heads=2, d=16, device="cpu", dtype=torch.float32)
    rows = b.workload_rows("smoke", p, ONE_CALL)
    ran = {r["impl"]: r for r in rows if "skipped" not in r}
    assert set(b.IMPLS) - set(ran) <= {"two flash-attn varlen calls", "transformers deepseek_ocr2 (SDPA + block mask)"}
    for impl, r in ran.items():
        assert r["max_abs_diff_vs_package"] < 1e-5, (impl, r)
    assert b.main([]) == 0   # no CUDA here: skips, says why, writes nothing


def test_causal_flow_deepseek_mask_is_the_prefix_lm_mask():
    import bench_causal_flow as b
    from deepencoder_kernels import reference

    allowed = reference.prefix_lm_allowed(8, 8, torch.tensor([4]))
    assert torch.equal(b.deepseek_mask(4, 2, torch.float32, "cpu"), reference.additive_mask(allowed, torch.float32).expand(2, 1, 8, 8))


def test_cpu_benchmark_paths():
    """bench_cpu.py's upstream-structured model on a narrow package encoder's parameter tensors gives the
    package's output, and one round of each timed path runs (views, blocks, counted peaks, varlen ops)."""
    import torch

    import bench_cpu

    enc = small_encoder()
    sizes = dict(sam=dict(dim=64, depth=3, num_heads=1, window_size=14, global_blocks=(1,), pos_grid=64, cn=16, c3=32),
                 clip=dict(dim=32, depth=1, heads=2, hidden=64), projector=(64, 24))
    up = bench_cpu.upstream_sharing(enc, sizes)
    assert all(p is q for p, q in zip(up.parameters(), enc.parameters()))
    pixels = torch.rand(1, 3, 160, 160) * 2 - 1      # a 10 x 10 trunk grid: windows padded, tables resized
    with torch.inference_mode():
        assert_close(up(pixels), enc.encode_pixels(pixels))
    clock = bench_cpu.Clock(cpu=False)
    for variant in bench_cpu.VARIANTS:
        total, stages = bench_cpu.run_view(variant, enc, up, pixels, clock)
        assert total > 0 and set(stages) == set(bench_cpu.STAGES) and all(t > 0 for t in stages.values()), (variant, stages)
        assert bench_cpu.run_block(variant, enc, up, torch.randn(1, 10, 10, 64), 1, clock) > 0
    peaks = bench_cpu.block_peaks(enc, up, 10, 1, torch.float32, "attention")
    assert set(peaks) == set(bench_cpu.VARIANTS) and all(b > 0 for b in peaks.values())
    g = torch.Generator().manual_seed(0)
    rows = bench_cpu.run_varlen(clock, 1, torch.float32, g, lambda *a: None, cases=lambda dtype, g: {
        "tiny": ((torch.randn(9, 2, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16), torch.tensor([0, 4, 9], dtype=torch.int32), 5), {})})
    assert rows[0]["backend"] == "sdpa-blocked" and rows[0]["speedup_vs_reference"] > 0
