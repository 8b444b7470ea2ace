"""End to end on the GPU: one DeepEncoder (v1) view, upstream's computation vs this package's kernels.

Upstream's computation is the ``reference`` backend: plain PyTorch doing what DeepSeek's code does
(SAM attention with the dense rel-pos bias through SDPA, windows partitioned and padded, the neck
and compressor as NCHW convs + LayerNorm2d, dense CLIP attention). This package is the fused
backend (``triton``). Same full-size model with seeded random weights (bf16), same view (the
package's rendered document page; Base: one 1024 x 1024 view -> 273 tokens), warm medians side by
side in one run (``triton.testing.do_bench``); the largest difference between the two outputs is
recorded with the times. Writes ``results/end_to_end_<gpu>.json``.

    cd benchmarks && python bench_end_to_end.py [--modes base tiny ...]

On a machine without CUDA it says that the GPU part was skipped and why (the test suite runs the
same code on the CPU: tests/test_benchmarks_smoke.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

import deepencoder_kernels as dk
from common import GpuRun, write_result


def rows(run: GpuRun = GpuRun(), enc=None, modes=("base",)) -> list[dict]:
    from deepencoder_kernels.profiler import random_encoder

    enc = enc or random_encoder(dtype=torch.bfloat16, device=run.device)
    page = dk.render_document_page()
    out = []
    for mode in modes:
        views = dk.preprocess(page, mode)
        n_views = 1 + (views.tiles.shape[0] if views.tiles is not None else 0)
        tokens, times = {}, {}
        for impl, backend in (("upstream's computation (reference)", "reference"), ("this package (fused)", run.fused)):
            def encode(backend=backend):
                with dk.backend(backend):
                    return enc.encode_views(views)
            with torch.inference_mode():
                tokens[impl] = encode()
                times[impl] = run.timer(encode)
        ref, fused = tokens.values()
        diff = (ref.float() - fused.float()).abs().max().item()
        for impl, ms in times.items():
            out.append(dict(kind=f"DeepEncoder v1, {mode}", model="v1", mode=mode, impl=impl, ms=ms, views=n_views,
                            tokens=ref.shape[0], views_per_s=n_views / ms * 1e3, max_abs_diff=diff))
            print(f"v1 {mode:<7}{impl:<38}{ms:9.2f} ms {n_views / ms * 1e3:8.1f} views/s")
        print(f"v1 {mode:<7}largest |reference - fused| = {diff:.3g} over {ref.numel()} values")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["base"], choices=["tiny", "small", "base", "large", "gundam"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("GPU benchmark skipped: torch has no usable CUDA device")
        return 0
    name = f"end_to_end_{torch.cuda.get_device_name().replace(' ', '_')}"
    print("wrote", write_result(name, rows(modes=args.modes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
