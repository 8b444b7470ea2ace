"""Activation bytes of SAM's rel-pos attention, measured per mode and block type (bf16, batch 1).

The reference (upstream's dense-bias path) is measured on any machine with the profiler's
MemoryTracker. The fused path is measured with the CUDA allocator when a GPU is present; on a CPU
machine its launcher runs under MemoryTracker with the Triton launch stubbed out
(``profiler.stubbed_launches``): the interpreter needs hours for a full-size global block, and a
Triton kernel allocates nothing of its own (it keeps q.R and the scores on chip), so the launcher's
allocations are the fused path's. A test checks that equals a real interpreted run.

    python benchmarks/bench_memory.py            # writes benchmarks/results/attention_memory_<device>.json
                                                 # and attention_training_memory_<device>.json

Training (the second file): what autograd keeps from the forward for the backward (unique storages,
the op's own inputs qkv / tables / pad_kv not counted: every path keeps those), reference vs fused,
and the fused backward launcher's own allocations (gradient output, row deltas, per-program table
and pad_kv partials), both measured the same way (launches stubbed on a CPU machine).
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():  # the fused launcher in interpreter mode (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import deepencoder_kernels as dk  # noqa: E402
from deepencoder_kernels.kernels import rel_pos_attention as attention_kernel  # noqa: E402
from deepencoder_kernels.kernels import rel_pos_attention_backward as attention_bwd_kernel  # noqa: E402
from deepencoder_kernels.profiler import MemoryTracker, stubbed_launches  # noqa: E402
from common import MODES, attention_inputs, write_result  # noqa: E402

attention_op = importlib.import_module("deepencoder_kernels.ops.rel_pos_attention")

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


def measure_fused_launcher(args):
    qkv, th, tw, heads, window, pad = args
    side_h, side_w = (window, window) if window else qkv.shape[1:3]
    attention_op.sequence_tables(th, tw, side_h, side_w)  # warm-up; the call below resizes them again (per call): counted
    with torch.inference_mode(), stubbed_launches(attention_kernel), MemoryTracker() as t:
        out = attention_op._fused(*args, interpret=True)
        out_bytes = out.numel() * out.element_size()
        del out
    return t.peak, out_bytes


def saved_for_backward(fn, inputs) -> int:
    """Bytes of the unique storages autograd saves while ``fn`` runs, ``inputs``' own storages excluded."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    inputs_ = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    return sum(n for ptr, n in storages.items() if ptr not in inputs_), out


def training_row(mode, block, args):
    qkv, th, tw, heads, window, pad = args
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    ref_saved, out = saved_for_backward(lambda: dk.reference.rel_pos_attention(*leaves), leaves)
    del out
    with dk.backend("triton-interpret"), stubbed_launches(attention_kernel):
        fused_saved, out = saved_for_backward(lambda: dk.ops.rel_pos_attention(*leaves), leaves)
    assert dk.last_backends()["rel_pos_attention"].backend == "triton-interpret"
    side_h, side_w = (window, window) if window else qkv.shape[1:3]
    tables = [dk.reference.resize_rel_pos(t, 2 * s - 1) for t, s in ((th, side_h), (tw, side_w))]
    with stubbed_launches(attention_kernel):
        out, lse = attention_kernel.rel_pos_attention_fwd(qkv, *tables, heads, window, pad, interpret=True, with_lse=True)
    original = attention_bwd_kernel.kernels_for
    attention_bwd_kernel.kernels_for = lambda interpret: (_NoLaunch(), _NoLaunch())
    try:
        with torch.inference_mode(), MemoryTracker() as t:
            grads = attention_bwd_kernel.rel_pos_attention_bwd(torch.empty_like(out), qkv, *tables, heads, window, pad,
                                                               out, lse, interpret=True)
            grad_bytes = grads[0].numel() * grads[0].element_size()
            del grads
    finally:
        attention_bwd_kernel.kernels_for = original
    return dict(mode=mode, block=block, reference_saved_bytes=ref_saved, fused_saved_bytes=fused_saved,
                fused_backward_peak_bytes=t.peak, dqkv_bytes=grad_bytes)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main_training() -> None:
    rows = []
    print(f"{'mode':<7}{'block':<10}{'ref saved MiB':>15}{'fused saved MiB':>17}{'fused bwd peak MiB':>20}{'dqkv MiB':>10}")
    for mode in MODES:
        for block in ("windowed", "global"):
            r = training_row(mode, block, attention_inputs(mode, block))
            rows.append(r)
            print(f"{mode:<7}{block:<10}{r['reference_saved_bytes'] / MiB:>15.1f}{r['fused_saved_bytes'] / MiB:>17.1f}"
                  f"{r['fused_backward_peak_bytes'] / MiB:>20.1f}{r['dqkv_bytes'] / MiB:>10.1f}")
    print("wrote", write_result("attention_training_memory_cpu", rows))


def main() -> int:
    cuda = torch.cuda.is_available()
    rows = []
    print(f"{'mode':<7}{'block':<10}{'ref peak MiB':>14}{'ref total MiB':>15}{'fused peak MiB':>16}{'output MiB':>12}")
    for mode in MODES:
        for block in ("windowed", "global"):
            args = attention_inputs(mode, block)
            ref_peak, ref_total = measure_reference(args)
            out_bytes = args[0].shape[0] * args[0].shape[1] * args[0].shape[2] * (args[0].shape[3] // 3) * 2
            if cuda:
                fused_peak, out_bytes = measure_fused_cuda(tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
            else:
                fused_peak, out_bytes = measure_fused_launcher(args)
            rows.append(dict(mode=mode, block=block, reference_peak_bytes=ref_peak, reference_total_bytes=ref_total,
                             fused_peak_bytes=fused_peak, output_bytes=out_bytes))
            fp = f"{fused_peak / MiB:>16.1f}"
            print(f"{mode:<7}{block:<10}{ref_peak / MiB:>14.1f}{ref_total / MiB:>15.1f}{fp}{out_bytes / MiB:>12.1f}")
    tag = "cuda" if cuda else "cpu"
    print("wrote", write_result(f"attention_memory_{tag}", rows))
    if not cuda:
        main_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
