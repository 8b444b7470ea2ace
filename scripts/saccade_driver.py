"""Drive the saccade gather's CUDA kernels (the nvcc-built extension) for compute-sanitizer:
a few shapes that reach every path (uniform and packed lengths, budgets of 0, 1, all and more
than the non-NaN count, ties and NaN scores, score and spatial order, several compaction chunks),
each checked bit for bit against the C++ CPU op.

    compute-sanitizer --tool memcheck python scripts/saccade_driver.py
    python scripts/saccade_driver.py --device cpu      # the same calls on the CPU op (a rehearsal)
"""
from __future__ import annotations

import argparse
import sys

import torch


def cases():
    g = torch.Generator().manual_seed(0)
    # (images, candidates per image or None for packed lengths, channels, budgets)
    yield "uniform", torch.randn(3, 4096, generator=g), None, torch.randn(3, 4096, 64, generator=g), torch.tensor([273, 0, 4096])
    ties = torch.randint(0, 4, (2, 300), generator=g).float()
    ties[0, ::7] = float("nan")
    yield "ties+nan", ties, None, torch.randn(2, 300, 40, generator=g), torch.tensor([300, 17])
    lengths = torch.tensor([65, 1, 401, 257])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    total = int(lengths.sum())
    yield "packed", torch.randn(1, total, generator=g)[0], cu, torch.randn(total, 24, generator=g), torch.tensor([64, 1, 400, 0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the kernels under test) or cpu (a rehearsal)")
    args = ap.parse_args(argv)
    import deepencoder_kernels as dk

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("saccade_driver: no CUDA device", file=sys.stderr)
        return 2
    failures = 0
    for name, scores, cu, feats, k in cases():
        for order in ("score", "spatial"):
            for dtype in (torch.float32, torch.bfloat16):
                f = feats.to(dtype)
                with dk.backend("cpp"):
                    want = dk.ops.saccade_gather(scores, f, k, cu_seqlens=cu, order=order)
                    got = dk.ops.saccade_gather(scores.to(device), f.to(device), k.to(device),
                                                cu_seqlens=None if cu is None else cu.to(device), order=order)
                    ran = dk.last_backends()["saccade_gather"].backend
                same = ran == "cpp" and all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
                failures += not same
                print(f"{name:<9} {order:<8} {str(dtype):<15} {device.type}: {'bit-exact vs the CPU op' if same else 'MISMATCH (ran ' + ran + ')'}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"saccade_driver: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
