"""The GPU benchmarks' code, run once on the CPU (interpreted kernels, one call per "timing"), so
that code no GPU has executed yet is at least known to run. No figures are produced or checked."""
import sys
from pathlib import Path

from PIL import Image

import deepencoder_kernels as dk
from conftest import small_encoder

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
