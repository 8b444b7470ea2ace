"""Packing a mixed batch: what it removes (counted here, on any machine) and what it buys (GPU).

The batch: 8 Tiny + 8 Small + 8 Base + 4 Large pages + 2 Gundam pages of 3 x 2 tiles, preprocessed
by the package (so the views and grids are the real ones).

- CPU (always): tokens, hidden-state bytes, attention-score bytes and attention FLOPs of SAM's
  global blocks and of CLIP, packed vs padded to the batch's longest sequence (what padded SDPA
  would run), from the views' shapes. Written to ``results/packing.json``.
- GPU (CUDA only, else skipped with the reason): the varlen kernel vs flash-attn varlen (when
  installed), padded SDPA with a key mask and nested-tensor SDPA on the CLIP lengths; and the packed
  encoder (``encode_views_packed``) vs the per-image loop (``encode_views``), views/s and tokens/s.
  Written to ``results/packed_<gpu>.json``.

    cd benchmarks && python bench_packed.py
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from common import GpuRun, write_result

MIXED_BATCH = [("tiny", (900, 1200), 8), ("small", (1000, 1300), 8), ("base", (1240, 1754), 8),
               ("large", (1654, 2339), 4), ("gundam", (1920, 1280), 2)]   # (mode, page px, count); Gundam -> 3 x 2
BF16 = 2


def mixed_views():
    out = []
    for mode, size, count in MIXED_BATCH:
        views = dk.preprocess(dk.render_document_page(*size), mode)
        out += [(mode, views)] * count
    return out


def sequences(views):
    """Every view's SAM grid side (global blocks) and CLIP length (compressed grid + CLS)."""
    sides = []
    for _, v in views:
        sides.append(v.global_view.shape[-1] // cfg.SAM_PATCH)
        if v.tiles is not None:
            sides += [v.tiles.shape[-1] // cfg.SAM_PATCH] * v.tiles.shape[0]
    return sides, [cfg.compressed_side(s) ** 2 + 1 for s in sides]


def padding_rows(views) -> list[dict]:
    sides, clip_lengths = sequences(views)
    rows = []
    for stage, lengths, dim, heads in (("SAM global block", [s * s for s in sides], cfg.SAM_DIM, cfg.SAM_HEADS),
                                       ("CLIP layer", clip_lengths, cfg.CLIP_DIM, cfg.CLIP_HEADS)):
        n, longest = len(lengths), max(lengths)
        packed_tokens, padded_tokens = sum(lengths), n * longest
        d = dim // heads
        rows.append(dict(
            stage=stage, sequences=n, packed_tokens=packed_tokens, padded_tokens=padded_tokens,
            packed_hidden_bytes=packed_tokens * dim * BF16, padded_hidden_bytes=padded_tokens * dim * BF16,
            packed_score_bytes=sum(L * L for L in lengths) * heads * BF16, padded_score_bytes=n * longest ** 2 * heads * BF16,
            packed_attention_flops=sum(4 * L * L * d for L in lengths) * heads,
            padded_attention_flops=n * 4 * longest ** 2 * d * heads,
        ))
    return rows


# ---- GPU ---------------------------------------------------------------------------------------


def attention_rows(clip_lengths, run: GpuRun = GpuRun(), heads: int = cfg.CLIP_HEADS, d: int = cfg.CLIP_DIM // cfg.CLIP_HEADS) -> list[dict]:
    dev = run.device
    total, longest, n = sum(clip_lengths), max(clip_lengths), len(clip_lengths)
    q, k, v = (torch.randn(total, heads, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(clip_lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    impls = {}

    def ours():
        with dk.backend(run.fused):
            return dk.ops.varlen_attention(q, k, v, cu, longest, check_values=False)
    impls["varlen (this package)"] = ours
    try:
        from flash_attn import flash_attn_varlen_func

        impls["flash-attn varlen"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
    except ImportError:
        print("flash-attn not installed: its row is skipped")
    pad = torch.zeros(n, longest, 3, heads, d, device=dev, dtype=torch.bfloat16)
    mask = torch.zeros(n, 1, 1, longest, dtype=torch.bool, device=dev)
    for i, L in enumerate(clip_lengths):
        mask[i, ..., :L] = True
    qp, kp, vp = (pad[:, :, j].transpose(1, 2) for j in range(3))
    impls["padded SDPA + key mask"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    nested = [torch.nested.as_nested_tensor(list(t.split(clip_lengths)), layout=torch.jagged).transpose(1, 2) for t in (q, k, v)]
    impls["nested-tensor SDPA"] = lambda: F.scaled_dot_product_attention(*nested)
    flops = sum(4 * L * L * d for L in clip_lengths) * heads
    rows = []
    for name, fn in impls.items():
        ms = run.timer(fn)
        rows.append(dict(kind="CLIP attention, one layer", impl=name, ms=ms, tflops=flops / ms / 1e9))
        print(f"{name:<26}{ms:8.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s")
    return rows


def encoder_rows(views, run: GpuRun = GpuRun(), enc=None) -> list[dict]:
    from deepencoder_kernels.profiler import random_encoder

    enc = enc or random_encoder(dtype=torch.bfloat16, device=run.device)
    batch = [v for _, v in views]
    n_views = sum(1 + (v.tiles.shape[0] if v.tiles is not None else 0) for v in batch)
    with torch.inference_mode(), dk.backend(run.fused):
        tokens = sum(t.shape[0] for t in enc.encode_views_packed(batch))
        loop_ms = run.timer(lambda: [enc.encode_views(v) for v in batch])
        packed_ms = run.timer(lambda: enc.encode_views_packed(batch))
    rows = []
    for name, ms in (("per-image loop", loop_ms), ("packed batch", packed_ms)):
        rows.append(dict(kind="encoder, mixed batch", impl=name, ms=ms, views_per_s=n_views / ms * 1e3,
                         tokens_per_s=tokens / ms * 1e3))
        print(f"{name:<26}{ms:9.1f} ms {n_views / ms * 1e3:8.1f} views/s {tokens / ms * 1e3:10.0f} tokens/s")
    return rows


def main() -> int:
    views = mixed_views()
    rows = padding_rows(views)
    for r in rows:
        print(f"{r['stage']:<18} {r['sequences']:>3} seqs: tokens {r['packed_tokens']} packed vs {r['padded_tokens']} padded; "
              f"scores {r['packed_score_bytes'] / 2**20:.0f} vs {r['padded_score_bytes'] / 2**20:.0f} MiB")
    print("wrote", write_result("packing", rows))
    if not torch.cuda.is_available():
        print("GPU part skipped: torch has no usable CUDA device")
        return 0
    _, clip_lengths = sequences(views)
    gpu_rows = attention_rows(clip_lengths) + encoder_rows(views)
    print("wrote", write_result(f"packed_{torch.cuda.get_device_name().replace(' ', '_')}", gpu_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
