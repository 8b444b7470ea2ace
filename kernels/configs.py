"""Every Triton launch config the package ships, in one place.

Read by the launchers, the static report (which AOT-compiles each entry at the real DeepEncoder
shapes) and the tests. Keys name the case; values are plain dicts of constexprs + launch options.
"""
from __future__ import annotations


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


def rel_pos_attention_config(window_size: int, seq_h: int, seq_w: int) -> tuple[str, dict]:
    name = "windowed" if window_size > 0 else "global"
    cfg = dict(REL_POS_ATTENTION[name])
    cfg["LP_H"] = max(16, next_pow2(2 * seq_h - 1))
    cfg["LP_W"] = max(16, next_pow2(2 * seq_w - 1))
    return name, cfg


# Backward of the SAM rel-pos attention: "dq" programs own a q tile (dq, the bias gradient through
# the gather: q.R tables and their gradients, [BLOCK_M, LP] fp32 each, on chip), "dkv" programs own
# a key tile (dk, dv; q.R recomputed per q tile).
REL_POS_ATTENTION_BWD = {
    "windowed": (dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1),
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
# as in the SAM kernel's global config.
VARLEN_ATTENTION = {
    "plain": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "rel_pos": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
}


def varlen_attention_config(has_bias: bool, max_side_h: int, max_side_w: int) -> dict:
    cfg = dict(VARLEN_ATTENTION["rel_pos" if has_bias else "plain"])
    cfg["LP_H"] = max(16, next_pow2(2 * max_side_h - 1))
    cfg["LP_W"] = max(16, next_pow2(2 * max_side_w - 1))
    return cfg


# Backward of the varlen attention: "dq" and "dkv" kernels as in the SAM backward; with the rel-pos
# bias the sizes of the SAM global backward (same on-chip q.R tables).
VARLEN_ATTENTION_BWD = {
    "plain": (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
              dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)),
    "rel_pos": (dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)),
}


def varlen_attention_bwd_config(has_bias: bool, max_side_h: int, max_side_w: int) -> tuple[dict, dict]:
    """(dq kernel config, dkv kernel config)."""
    dq, dkv = VARLEN_ATTENTION_BWD["rel_pos" if has_bias else "plain"]
    lp = dict(LP_H=max(16, next_pow2(2 * max_side_h - 1)), LP_W=max(16, next_pow2(2 * max_side_w - 1)))
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
    cfg = dict(COMPRESS[name])
    if "BLOCK_N" not in cfg:  # LayerNorm step: every output channel in the tile
        cfg["BLOCK_N"] = max(16, next_pow2(c_out))
    return cfg


# Backward of the neck + compressor (not tuned per device yet). Input gradients (*_dgrad): pixel
# tiles x input channels, reducing over taps x output channels; the *_ln ones hold every channel of
# a pixel (the LayerNorm backward is fused). Weight gradients (*_wgrad): input x output channel
# tiles per tap, reducing over pixels BLOCK_K at a time, split into fixed pixel ranges until about
# PROGRAMS programs run (each split >= MIN_PIXELS pixels). The largest tiles found to compile with 0
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
    "neck_1x1_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, PROGRAMS=512, MIN_PIXELS=256),
    "neck_3x3_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2, PROGRAMS=512, MIN_PIXELS=256),
    "net2_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2, PROGRAMS=512, MIN_PIXELS=256),
    "net3_wgrad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, PROGRAMS=512, MIN_PIXELS=256),
}


def compress_bwd_config(name: str, channels: int) -> dict:
    cfg = dict(COMPRESS_BWD[name])
    if "BLOCK_N" not in cfg:  # LayerNorm backward: every channel of a pixel in the tile
        cfg["BLOCK_N"] = max(16, next_pow2(channels))
    return cfg
