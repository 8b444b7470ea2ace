"""Activation bytes of SAM's rel-pos attention, measured per mode and block type (bf16, batch 1).

The reference (upstream's dense-bias path) is measured on any machine with the profiler's
MemoryTracker. The fused kernel is measured with the CUDA allocator when a GPU is present; on a
CPU machine it is reported as not measured.

    python benchmarks/bench_memory.py            # writes benchmarks/results/attention_memory_<device>.json
"""
from __future__ import annotations

import sys

import torch

import deepencoder_kernels as dk
from deepencoder_kernels.profiler import MemoryTracker
from common import MODES, attention_inputs, write_result

MiB = 2**20


def measure_reference(args):
    with torch.inference_mode(), MemoryTracker() as t:
        out = dk.reference.rel_pos_attention(*args)
        del out
    return t.peak, t.total


def measure_fused_cuda(args):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with dk.backend("triton"), torch.inference_mode():
        out = dk.ops.rel_pos_attention(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out.numel() * out.element_size()


def main() -> int:
    cuda = torch.cuda.is_available()
    rows = []
    print(f"{'mode':<7}{'block':<10}{'ref peak MiB':>14}{'ref total MiB':>15}{'fused peak MiB':>16}{'output MiB':>12}")
    for mode in MODES:
        for block in ("windowed", "global"):
            args = attention_inputs(mode, block)
            ref_peak, ref_total = measure_reference(args)
            out_bytes = args[0].shape[0] * args[0].shape[1] * args[0].shape[2] * (args[0].shape[3] // 3) * 2
            fused_peak = None
            if cuda:
                fused_peak, out_bytes = measure_fused_cuda(tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
            rows.append(dict(mode=mode, block=block, reference_peak_bytes=ref_peak, reference_total_bytes=ref_total,
                             fused_peak_bytes=fused_peak, output_bytes=out_bytes))
            fp = f"{fused_peak / MiB:>16.1f}" if fused_peak is not None else f"{'(no GPU)':>16}"
            print(f"{mode:<7}{block:<10}{ref_peak / MiB:>14.1f}{ref_total / MiB:>15.1f}{fp}{out_bytes / MiB:>12.1f}")
    tag = "cuda" if cuda else "cpu"
    print("wrote", write_result(f"attention_memory_{tag}", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
