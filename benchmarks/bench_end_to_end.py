"""End to end on the GPU: one page through DeepEncoder (v1) or DeepEncoder V2, upstream's computation
vs this package.

Upstream's computation is the ``reference`` backend: plain PyTorch doing what DeepSeek's code does
(SAM attention with the dense rel-pos bias through SDPA, windows partitioned and padded, the neck
and compressor as NCHW convs + LayerNorm2d; v1's dense CLIP attention, V2's causal-flow attention
with its dense additive prefix-LM mask). This package is the ``auto`` backend, what a user gets:
each op's fused kernel wherever it can run; every row records which backend each op ran. Same
full-size model with seeded random weights (bf16), same page (the package's rendered document page:
v1 Base is one 1024 x 1024 view -> 273 tokens; V2 dynamic is a 1024 global view + 768 tiles), warm
medians side by side in one run (``triton.testing.do_bench``); the largest difference between the two
outputs is recorded with the times. Writes ``results/end_to_end_<gpu>.json`` (``--model v2``:
``end_to_end_v2_<gpu>.json``).

    cd benchmarks && python bench_end_to_end.py [--model v1|v2] [--modes base ...]

On a machine without CUDA it says that the GPU part was skipped and why (the test suite runs the
same code on the CPU: tests/test_benchmarks_smoke.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

import deepencoder_kernels as dk
from common import GpuRun, write_result

DEFAULT_MODES = {"v1": "base", "v2": "dynamic"}


def rows(run: GpuRun = GpuRun(), enc=None, modes=None, model: str = "v1", fused: str = "auto") -> list[dict]:
    from deepencoder_kernels.profiler import random_encoder

    enc = enc or random_encoder(dtype=torch.bfloat16, device=run.device, model=model)
    name = "DeepEncoder V2" if model == "v2" else "DeepEncoder v1"
    page = dk.render_document_page()
    out = []
    for mode in modes or (DEFAULT_MODES[model],):
        views = dk.preprocess(page, mode, model=model)
        n_views = 1 + (views.tiles.shape[0] if views.tiles is not None else 0)
        tokens, times, backends = {}, {}, {}
        for impl, backend in (("upstream's computation (reference)", "reference"), ("this package", fused)):
            def encode(backend=backend):
                with dk.backend(backend):
                    return enc.encode_views(views)
            with torch.inference_mode():
                dk.clear_last_backends()
                tokens[impl] = encode()
                backends[impl] = ", ".join(f"{op} {c.backend}" for op, c in sorted(dk.last_backends().items()))
                times[impl] = run.timer(encode)
        ref, ours = tokens.values()
        diff = (ref.float() - ours.float()).abs().max().item()
        for impl, ms in times.items():
            out.append(dict(kind=f"{name}, {mode}", model=model, mode=mode, impl=impl, ms=ms, views=n_views, tokens=ref.shape[0],
                            views_per_s=n_views / ms * 1e3, max_abs_diff=diff, backends=backends[impl]))
            print(f"{model} {mode:<8}{impl:<38}{ms:9.2f} ms {n_views / ms * 1e3:8.1f} views/s  ({backends[impl]})")
        print(f"{model} {mode:<8}largest |reference - this package| = {diff:.3g} over {ref.numel()} values")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="v1", choices=sorted(DEFAULT_MODES), help="encoder generation (default v1)")
    ap.add_argument("--modes", nargs="+", help="modes (default: base for v1, dynamic for v2)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("GPU benchmark skipped: torch has no usable CUDA device")
        return 0
    name = f"end_to_end{'_v2' if args.model == 'v2' else ''}_{torch.cuda.get_device_name().replace(' ', '_')}"
    print("wrote", write_result(name, rows(modes=args.modes, model=args.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
