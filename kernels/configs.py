"""Every Triton launch config the package ships, in one place.

Read by the launchers, the static report (which AOT-compiles each entry at the real DeepEncoder
shapes) and the tests. Keys name the case; values are plain dicts of constexprs + launch options.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# SAM rel-pos attention. LP_* (the padded rel-pos table length, 2 S - 1 rounded up to a power of
# two) follows from the sequence grid. The per-q-tile q.R tables ([BLOCK_M, LP_H + LP_W] fp32) live
# in registers, so global grids (LP 64..256) take smaller q tiles than the windows (LP 32). These
# are the largest tiles that compile with 0 spill bytes on sm_80 and sm_90a (static report).
REL_POS_ATTENTION = {
    "windowed": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    "global": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
}


def rel_pos_attention_config(window_size: int, seq_h: int, seq_w: int, device=None) -> tuple[str, dict]:
    name = "windowed" if window_size > 0 else "global"
    cfg = _chosen("rel_pos_attention", name, tuning_key("rel_pos_attention", name, seq_h, seq_w), device)
    cfg["LP_H"] = max(16, next_pow2(2 * seq_h - 1))
    cfg["LP_W"] = max(16, next_pow2(2 * seq_w - 1))
    if not fits(cfg, max(cfg["LP_H"], cfg["LP_W"])):   # a candidate meant for smaller grids
        cfg = {**REL_POS_ATTENTION[name], "LP_H": cfg["LP_H"], "LP_W": cfg["LP_W"]}
    cfg.pop("MAX_LP", None)
    if cfg.get("QR_TILE"):   # q.R_h per key tile: the table rows one (q tile, key tile) pair can index
        rows = lambda n: 1 + -(-(n - 1) // seq_w)  # noqa: E731  (grid rows n consecutive tokens can touch)
        cfg["QR_TILE"] = max(cfg["QR_TILE"], next_pow2(rows(cfg["BLOCK_M"]) + rows(cfg["BLOCK_N"]) - 1))
    return name, cfg


# Backward of the SAM rel-pos attention: "dq" programs own a q tile (dq, the bias gradient through
# the gather: q.R tables and their gradients, [BLOCK_M, LP] fp32 each, on chip), "dkv" programs own
# a key tile (dk, dv; q.R recomputed per q tile).
REL_POS_ATTENTION_BWD = {
    "windowed": (dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
                 dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)),
    "global": (dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
               dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)),
}


def rel_pos_attention_bwd_config(window_size: int, seq_h: int, seq_w: int) -> tuple[str, dict, dict]:
    """(name, dq kernel config, dkv kernel config)."""
    name = "windowed" if window_size > 0 else "global"
    lp = dict(LP_H=max(16, next_pow2(2 * seq_h - 1)), LP_W=max(16, next_pow2(2 * seq_w - 1)))
    lk = dict(LK_H=max(16, next_pow2(seq_h)), LK_W=max(16, next_pow2(seq_w)))   # the dq kernel's dS sums per key row / column
    dq, dkv = REL_POS_ATTENTION_BWD[name]
    return name, {**dq, **lp, **lk}, {**dkv, **lp}


# Packed varlen attention. Without a bias (CLIP: 65..401 tokens, d = 64) the q tile is 64 rows so
# short sequences still fill the GPU; with SAM's rel-pos bias the on-chip q.R tables set the size
# as in the SAM kernel's global config. "prefix": DeepEncoder V2's causal-flow stage (prefix-LM
# mask, GQA 14/2, RoPE on load, d = 64, sequences of 288 and 512 tokens).
VARLEN_ATTENTION = {
    "plain": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "rel_pos": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    "prefix": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),   # 64 x 64 spills on sm_80 (RoPE'd k tiles in fp32)
}


def varlen_entry(has_bias: bool, prefix: bool) -> str:
    """The configs entry of a varlen launch: the rel-pos tables set the tile when present."""
    return "rel_pos" if has_bias else "prefix" if prefix else "plain"


def varlen_attention_config(has_bias: bool, max_side_h: int, max_side_w: int, device=None, prefix: bool = False) -> dict:
    entry = varlen_entry(has_bias, prefix)
    cfg = _chosen("varlen_attention", entry, tuning_key("varlen_attention", entry, *((max_side_h, max_side_w) if has_bias else ())), device)
    cfg["LP_H"] = max(16, next_pow2(2 * max_side_h - 1))
    cfg["LP_W"] = max(16, next_pow2(2 * max_side_w - 1))
    return cfg


# Backward of the varlen attention: "dq" and "dkv" kernels as in the SAM backward; with the rel-pos
# bias the sizes of the SAM global backward (same on-chip q.R tables).
VARLEN_ATTENTION_BWD = {
    "plain": (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
              dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)),
    "rel_pos": (dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
                dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)),
    # tables past 128 rows (grids past 64, i.e. Large): the dkv kernel's key tile halves (32 rows
    # spill there); the 32-row tile is kept below, where 16 rows spilled on Triton 3.6 (sm_90a)
    "rel_pos_lp256": (dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
                      dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)),
    # causal-flow (prefix-LM, GQA, RoPE on load): the dkv programs loop over their kv head's query
    # group (7 heads in V2); 64-key dkv tiles spill (RoPE'd q tiles in fp32), 8 warps keep 32 at
    # ~180 registers
    "prefix": (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
               dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)),
}


def varlen_attention_bwd_config(has_bias: bool, max_side_h: int, max_side_w: int, prefix: bool = False) -> tuple[dict, dict]:
    """(dq kernel config, dkv kernel config)."""
    lp = dict(LP_H=max(16, next_pow2(2 * max_side_h - 1)), LP_W=max(16, next_pow2(2 * max_side_w - 1)))
    name = ("prefix" if prefix else "plain") if not has_bias else "rel_pos" if max(lp.values()) <= 128 else "rel_pos_lp256"
    dq, dkv = VARLEN_ATTENTION_BWD[name]
    lk = dict(LK_H=max(16, next_pow2(max_side_h)), LK_W=max(16, next_pow2(max_side_w)))
    return {**dq, **lp, **lk}, {**dkv, **lp}


# Neck + compressor convolutions (implicit GEMM over channels-last pixels). The LayerNorm steps
# hold all output channels in one tile (BLOCK_N = C_out rounded up to a power of two: 256 in
# DeepEncoder), so their pixel tiles are smaller.
COMPRESS = {
    "neck_1x1_ln": dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
    "neck_3x3_ln": dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
    "net2_3x3_s2": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3),
    "net3_3x3_s2": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
}


def compress_config(name: str, c_out: int, device=None) -> dict:
    cfg = _chosen("compress", name, name, device)
    if "BLOCK_N" not in cfg:  # LayerNorm step: every output channel in the tile
        cfg["BLOCK_N"] = max(16, next_pow2(c_out))
    return cfg


# Backward of the neck + compressor (not tuned per device yet). Input gradients (*_dgrad): pixel
# tiles x input channels, reducing over taps x output channels; the *_ln ones hold every channel of
# a pixel (the LayerNorm backward is fused). Weight gradients (*_wgrad): input x output channel
# tiles per tap, reducing over pixels BLOCK_K at a time, split into fixed pixel ranges until about
# PROGRAMS programs run (two per H100 SM; each split >= MIN_PIXELS pixels; at most MAX_SPLITS, as each
# split holds an fp32 copy of the weight gradient). The largest tiles found to compile with 0
# spill bytes on sm_80 and sm_90a (static report).
COMPRESS_BWD = {
    # the training forward's LayerNorm steps, which also store the pre-norm output and statistics:
    # 64-pixel tiles spill there
    "neck_1x1_ln_save": dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=3),
    "neck_3x3_ln_save": dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=3),
    "neck_1x1_dgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    "neck_3x3_dgrad_ln": dict(BLOCK_M=16, BLOCK_K=32, num_warps=8, num_stages=3),   # 32 pixels spill on sm_90a
    "net2_dgrad_ln": dict(BLOCK_M=16, BLOCK_K=32, num_warps=8, num_stages=3),
    "net3_dgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    "neck_1x1_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, PROGRAMS=264, MIN_PIXELS=256, MAX_SPLITS=4),
    "neck_3x3_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2, PROGRAMS=264, MIN_PIXELS=256, MAX_SPLITS=2),
    "net2_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2, PROGRAMS=264, MIN_PIXELS=256, MAX_SPLITS=2),
    "net3_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, PROGRAMS=264, MIN_PIXELS=256, MAX_SPLITS=2),
}


def compress_bwd_config(name: str, channels: int) -> dict:
    cfg = dict(COMPRESS_BWD[name])
    if "BLOCK_N" not in cfg:  # LayerNorm backward: every channel of a pixel in the tile
        cfg["BLOCK_N"] = max(16, next_pow2(channels))
    return cfg


# ---- tuning: candidates and per-device winners ------------------------------------------------
# Every launch config the tuner may try, per entry above, the shipped default first. The static
# report compiles each one at the real shapes (sm_80, sm_90a), so a GPU only ever times configs
# known to compile with 0 spills within shared memory; the launchers accept a tuned winner only if
# it is still one of these.
CANDIDATES = {
    "rel_pos_attention": {
        "windowed": [REL_POS_ATTENTION["windowed"],
                     dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
                     dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)],
        "global": [REL_POS_ATTENTION["global"],
                   dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
                   # q.R_h per key tile (QR_TILE rows): only the w table stays on chip, so 64-row q tiles
                   # fit up to Base's grid (128-row tables); with Large's 256 rows the w table spills
                   dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, QR_TILE=16, MAX_LP=128)],
    },
    "varlen_attention": {
        "plain": [VARLEN_ATTENTION["plain"],
                  dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                  dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                  dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)],
        "rel_pos": [VARLEN_ATTENTION["rel_pos"]],   # the others tried spill somewhere (Large's 256-row tables)
        # causal-flow (L = 288 / 512): smaller q tiles skip more of the masked keys and give more
        # programs per view; larger ones reuse each K/V tile (and its RoPE) for more rows
        "prefix": [VARLEN_ATTENTION["prefix"],
                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
                   dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)],
    },
    # the LayerNorm steps hold 256 output channels per tile: most other tilings spill (static report)
    "compress": {
        "neck_1x1_ln": [COMPRESS["neck_1x1_ln"], dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=2)],
        "neck_3x3_ln": [COMPRESS["neck_3x3_ln"]],
        "net2_3x3_s2": [COMPRESS["net2_3x3_s2"]],
        "net3_3x3_s2": [COMPRESS["net3_3x3_s2"], dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)],
    },
}

TUNED_DIR = Path(__file__).resolve().parent / "tuned"   # <device slug>.json, written by `deepencoder-kernels tune`
_FORCED: dict = {}   # (kernel, key) -> config, set only by forced() (the tuner)


def fits(candidate: dict, lp: int) -> bool:
    """Whether a candidate serves rel-pos tables of ``lp`` rows (``MAX_LP``: its on-chip tables spill
    past that; the static report compiles it only where it fits, the launchers use it only there)."""
    return lp <= candidate.get("MAX_LP", lp)


def tuning_key(kernel: str, entry: str, seq_h: int = 0, seq_w: int = 0) -> str:
    """The tuned table's key for a launch: the entry plus, for attention with rel-pos, the sequence
    grid (it sets the table length and the work per tile)."""
    return f"{entry}/{seq_h}x{seq_w}" if seq_h else entry


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str) -> dict:
    """Winners recorded for one device (empty when never tuned there)."""
    path = TUNED_DIR / f"{device_slug(device_name)}.json"
    return json.loads(path.read_text()).get("entries", {}) if path.exists() else {}


def _cuda_device_name(device) -> str:
    import torch

    index = torch.device(device).index
    return _device_names(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _device_names(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def _chosen(kernel: str, entry: str, key: str, device) -> dict:
    """Forced (tuner) > tuned for this CUDA device > the shipped default. A tuned config that is no
    longer a candidate (stale table) is ignored."""
    if (kernel, key) in _FORCED:
        return dict(_FORCED[kernel, key])
    default = CANDIDATES[kernel][entry][0]
    if device is None or str(device).split(":")[0] != "cuda":
        return dict(default)
    win = tuned_table(_cuda_device_name(device)).get(f"{kernel}|{key}", {}).get("config")
    return dict(win if win in CANDIDATES[kernel][entry] else default)


@contextlib.contextmanager
def forced(kernel: str, key: str, config: dict):
    """Launch ``kernel`` with ``config`` wherever its tuning key is ``key`` (the tuner's hook)."""
    _FORCED[kernel, key] = config
    try:
        yield
    finally:
        _FORCED.pop((kernel, key), None)
