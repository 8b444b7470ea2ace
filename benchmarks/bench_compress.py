"""Neck + compressor: the reference chain (upstream's permute + convs + LayerNorm2d) vs the fused
channels-last kernels, per mode, bf16, batch 1.

Counted and measured on any machine:
  - FLOPs (the op's formula), memory passes and bytes moved: the reference by ``TrafficCounter``
    (each aten op reading its inputs and writing its outputs once), the fused path from the tensors
    of its actual kernel launches (each reads its input, weights and LN parameters once, writes once);
  - peak and total activation bytes allocated (``MemoryTracker``). Without a GPU the fused launcher
    runs in Triton's interpreter, which allocates nothing through torch, so what is measured is
    exactly what the launcher allocates on a GPU.
  - a training step (forward + backward, gradients of x and every parameter): what is kept for the
    backward, peak and total bytes; the fused path through its launchers (stubbed Triton launches on
    a CPU machine: the interpreter would need hours at full size).
On a CUDA machine it also times, bf16, batch 1 and 32: the PyTorch chain in NCHW, in channels-last,
under torch.compile, and the fused kernels; and forward + backward, reference autograd vs fused.
Elsewhere that part is skipped, saying why.

    cd benchmarks && python bench_compress.py     # writes results/compress_<device>.json
    cd benchmarks && python bench_compress.py --timing-only --modes base --batches 1   # a GPU's headline row only
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():  # the fused launcher runs in Triton's interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import deepencoder_kernels as dk  # noqa: E402
from deepencoder_kernels import config as cfg  # noqa: E402
from deepencoder_kernels.kernels import compress as compress_kernel  # noqa: E402
from deepencoder_kernels.kernels.compress import compress_bwd, compress_fwd, record_launches  # noqa: E402
compress_op = importlib.import_module("deepencoder_kernels.ops.compress")  # the module (ops.compress is the function)
from deepencoder_kernels.profiler import MemoryTracker, TrafficCounter, stubbed_launches  # noqa: E402
from common import MODES, GpuRun, write_result  # noqa: E402


def inputs(mode: str, batch: int = 1, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = cfg.sam_grid(MODES[mode])
    cin, cn, c2, c3 = cfg.SAM_DIM, cfg.SAM_NECK_DIM, cfg.SAM_OUT_DIM // 2, cfg.SAM_OUT_DIM
    shapes = [(batch, side, side, cin), (cn, cin, 1, 1), (cn,), (cn,), (cn, cn, 3, 3), (cn,), (cn,), (c2, cn, 3, 3), (c3, c2, 3, 3)]
    return [torch.randn(s, generator=g).mul_(0.1).to(device, dtype) for s in shapes]


def measure_reference(args):
    with torch.inference_mode(), TrafficCounter() as traffic:
        dk.reference.compress(*args, eps=1e-6)
    with torch.inference_mode(), MemoryTracker() as memory:
        out = dk.reference.compress(*args, eps=1e-6)
        del out
    return dict(passes=traffic.passes, bytes=traffic.bytes_read + traffic.bytes_written, peak=memory.peak, allocated=memory.total)


def measure_fused(args, interpret: bool):
    compress_op._fused(*args, 1e-6, interpret=interpret)  # warm-up; the timed call re-lays out its weights (per call): counted
    with torch.inference_mode(), MemoryTracker() as memory, record_launches() as launches:
        out = compress_op._fused(*args, 1e-6, interpret=interpret)
        del out
    return dict(passes=len(launches), bytes=sum(l["bytes_read"] + l["bytes_written"] for l in launches),
                peak=memory.peak, allocated=memory.total)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_reference_training(args):
    """Forward + backward through autograd on the reference chain: what autograd keeps for backward
    (live after the forward, less the output), the step's peak and total allocation (gradients of x
    and the parameters included, as in the fused row)."""
    leaves = [a.detach().requires_grad_() for a in args]
    with torch.no_grad():
        grad = torch.ones_like(dk.reference.compress(*args, eps=1e-6))
    with MemoryTracker() as memory:
        out = dk.reference.compress(*leaves, eps=1e-6)
        saved = memory.live - _nbytes(out)
        grads = torch.autograd.grad(out, leaves, grad)
        del out, grads
    return dict(saved=saved, peak=memory.peak, allocated=memory.total)


def measure_fused_training(args, interpret: bool):
    """The same step on the fused path: the launchers the training custom ops run (their allocations
    are inside the ops, out of a dispatch mode's sight when called through them). On a CPU machine the
    Triton launches are stubbed (the interpreter needs hours for a full-size backward; a kernel
    allocates nothing of its own, so the launchers' allocations are the path's)."""
    x, *w = args
    with torch.no_grad():
        grad = torch.ones_like(dk.reference.compress(*args, eps=1e-6))
    stub = stubbed_launches(compress_kernel) if interpret else contextlib.nullcontext()
    # the training ops re-lay out the conv weights at every call, forward and backward: counted
    with torch.no_grad(), stub, MemoryTracker() as memory:
        tokens, *saved = compress_fwd(x, *compress_op.kernel_weights(*w), 1e-6, interpret=interpret, train=True)
        saved_bytes = memory.live - _nbytes(tokens)
        grads = compress_bwd(grad, x, *compress_op.kernel_weights(*w), *saved, interpret=interpret)
        del tokens, saved, grads
    return dict(saved=saved_bytes, peak=memory.peak, allocated=memory.total)


def gpu_rows(run: GpuRun = GpuRun(), modes=tuple(MODES), batches=(1, 32)) -> list[dict]:
    import torch.nn.functional as F

    rows = []
    for mode in modes:
        for batch in batches:
            args = inputs(mode, batch, device=run.device)
            x, w = args[0], args[1:]

            def nchw(x=x):
                return dk.reference.compress(x, *w, eps=1e-6)

            wl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in w]

            def channels_last(x=x, wl=wl):
                y = x.permute(0, 3, 1, 2)  # a channels-last NCHW view: cuDNN's NHWC kernels, no copy
                y = dk.reference.layer_norm_2d(F.conv2d(y, wl[0]), wl[1], wl[2], 1e-6)
                y = dk.reference.layer_norm_2d(F.conv2d(y, wl[3], padding=1), wl[4], wl[5], 1e-6)
                y = F.conv2d(F.conv2d(y, wl[6], stride=2, padding=1), wl[7], stride=2, padding=1)
                return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])

            compiled = torch.compile(nchw, backend=run.compile_backend)

            def fused(x=x):
                with dk.backend(run.fused):
                    return dk.ops.compress(x, *w, eps=1e-6)

            leaves = [t.detach().requires_grad_() for t in args]
            with torch.no_grad():
                grad = torch.ones_like(nchw())

            def train_reference(leaves=leaves, grad=grad):   # forward + backward, autograd through the chain
                return torch.autograd.grad(dk.reference.compress(*leaves, eps=1e-6), leaves, grad)

            def train_fused(leaves=leaves, grad=grad):       # forward + backward on the fused kernels
                with dk.backend(run.fused):
                    out = dk.ops.compress(*leaves, eps=1e-6)
                return torch.autograd.grad(out, leaves, grad)

            for name, fn in (("PyTorch NCHW", nchw), ("PyTorch channels-last", channels_last),
                             ("torch.compile", compiled), ("fused (this package)", fused),
                             ("fwd+bwd PyTorch NCHW", train_reference), ("fwd+bwd fused (this package)", train_fused)):
                ms = run.timer(fn)
                rows.append(dict(mode=mode, batch=batch, impl=name, ms=ms))
                print(f"{mode:<6}{batch:>4} {name:<28}{ms:8.3f} ms")
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timing-only", action="store_true", help="only the GPU timings (skip the counted passes, bytes and memory)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="modes to time on the GPU (default: all)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes to time on the GPU (default: 1 32)")
    opts = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if opts.timing_only:
        if not cuda:
            print("GPU timing skipped: torch has no usable CUDA device")
            return 0
        rows = gpu_rows(modes=tuple(opts.modes), batches=tuple(opts.batches))
        print("wrote", write_result(f"compress_timing_{torch.cuda.get_device_name().replace(' ', '_')}", rows))
        return 0
    rows = []
    print(f"{'mode':<7}{'GFLOPs':>8} | {'ref passes':>10}{'ref MiB moved':>14}{'ref peak MiB':>13} | "
          f"{'fused passes':>12}{'fused MiB moved':>16}{'fused peak MiB':>15}")
    for mode in MODES:
        args = inputs(mode, device="cuda" if cuda else "cpu")
        ref, fused = measure_reference(args), measure_fused(args, interpret=not cuda)
        flops = compress_op.flops(args[0].shape, args[1].shape, args[7].shape, args[8].shape)
        training = dict(reference=measure_reference_training(args), fused=measure_fused_training(args, interpret=not cuda),
                        fused_launches="real" if cuda else "stubbed")
        rows.append(dict(mode=mode, flops=flops, reference=ref, fused=fused, training=training))
        MiB = 2**20
        print(f"{mode:<7}{flops / 1e9:>8.2f} | {ref['passes']:>10}{ref['bytes'] / MiB:>14.1f}{ref['peak'] / MiB:>13.1f} | "
              f"{fused['passes']:>12}{fused['bytes'] / MiB:>16.1f}{fused['peak'] / MiB:>15.1f}")
        t_ref, t_fused = training["reference"], training["fused"]
        print(f"{'':7}training step: saved for backward {t_ref['saved'] / MiB:.1f} -> {t_fused['saved'] / MiB:.1f} MiB, "
              f"peak {t_ref['peak'] / MiB:.1f} -> {t_fused['peak'] / MiB:.1f} MiB")
    print("wrote", write_result(f"compress_{'cuda' if cuda else 'cpu'}", rows))
    if not cuda:
        print("GPU timing skipped: torch has no usable CUDA device")
        return 0
    print("wrote", write_result(f"compress_timing_{torch.cuda.get_device_name().replace(' ', '_')}",
                                gpu_rows(modes=tuple(opts.modes), batches=tuple(opts.batches))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
