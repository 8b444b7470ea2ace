"""Saccade gather: the C++ op vs torch.topk + torch.gather, at the real shapes.

Candidates: 4096 SAM positions (C = 768, the trunk at 1024 px) and 256 compressed tokens
(C = 1024), batch 1 / 8 / 64, bf16 features, fp32 scores. Two baselines, timed side by side in one
run (this machine is shared and noisy, so the ratios are what to read):
  - one k for the batch: ``torch.topk(scores, k)`` + ``torch.gather`` (what ToMe/EViT-style code does);
  - a per-image k: a Python loop of topk + index per image (torch has no per-row k).
On a CUDA machine with the extension built with CUDA it also times the CUDA op; otherwise it says
that the GPU part was skipped and why.

    python benchmarks/bench_saccade_gather.py     # writes benchmarks/results/saccade_gather_<device>.json
"""
from __future__ import annotations

import sys

import torch
import torch.utils.benchmark as tb

import deepencoder_kernels as dk
from deepencoder_kernels.ops.saccade_gather import _extension_serves
from common import write_result

SHAPES = [(4096, 768, 273), (256, 1024, 64)]  # candidates, channels, budget (Base: 273 tokens)
BATCHES = (1, 8, 64)


def inputs(B, N, C, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, N, generator=g).to(device)
    features = torch.randn(B, N, C, generator=g).to(device, torch.bfloat16)
    one_k = torch.full((B,), k, dtype=torch.int64, device=device)
    # per-image budgets around k (each image its own, as a resolution-scaled budget gives)
    mixed_k = torch.randint(k // 2, min(2 * k, N) + 1, (B,), generator=g).to(device)
    return scores, features, one_k, mixed_k


def torch_one_k(scores, features, k: int):
    idx = torch.topk(scores, k, dim=1).indices
    return torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1])), idx


def torch_per_image(scores, features, ks: list[int]):
    rows, positions = [], []
    for b, kb in enumerate(ks):
        idx = torch.topk(scores[b], kb).indices
        rows.append(features[b, idx])
        positions.append(idx)
    return torch.cat(rows), torch.cat(positions)


def ours(scores, features, k):
    with dk.backend("cpp"):
        return dk.ops.saccade_gather(scores, features, k)


def median_us(fn, *args) -> float:
    t = tb.Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=0.3).median * 1e6


def run(device: str) -> list[dict]:
    rows = []
    print(f"{device}: {'N':>5}{'C':>6}{'k':>5}{'B':>4} {'ours us':>10}{'topk+gather us':>16}{'ratio':>7}"
          f" | {'ours mixed-k us':>16}{'per-image loop us':>18}{'ratio':>7}")
    for N, C, k in SHAPES:
        for B in BATCHES:
            scores, features, one_k, mixed_k = inputs(B, N, C, k, device)
            # same answer before timing: the op and the baselines select the same rows
            got = ours(scores, features, one_k)
            want, _ = torch_one_k(scores, features, k)
            assert torch.equal(got[0], want.reshape(-1, C)), "op and torch.topk+gather disagree"
            t_ours = median_us(ours, scores, features, one_k)
            t_torch = median_us(torch_one_k, scores, features, k)
            ks = mixed_k.tolist()
            t_ours_mixed = median_us(ours, scores, features, mixed_k)
            t_loop = median_us(torch_per_image, scores, features, ks)
            rows.append(dict(device=device, candidates=N, channels=C, k=k, batch=B, ours_us=t_ours, topk_gather_us=t_torch,
                             speedup_one_k=t_torch / t_ours, ours_mixed_k_us=t_ours_mixed, per_image_loop_us=t_loop,
                             speedup_mixed_k=t_loop / t_ours_mixed))
            print(f"{device}: {N:>5}{C:>6}{k:>5}{B:>4} {t_ours:>10.1f}{t_torch:>16.1f}{t_torch / t_ours:>7.2f}"
                  f" | {t_ours_mixed:>16.1f}{t_loop:>18.1f}{t_loop / t_ours_mixed:>7.2f}")
    return rows


def main() -> int:
    rows = run("cpu")
    print("wrote", write_result("saccade_gather_cpu", rows))
    if not torch.cuda.is_available():
        print("GPU part skipped: torch has no usable CUDA device")
        return 0
    reason = _extension_serves(torch.empty(1, device="cuda"))
    if reason:
        print(f"GPU part skipped: {reason}")
        return 0
    print("wrote", write_result("saccade_gather_cuda", run("cuda")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
