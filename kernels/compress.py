"""SAM's neck + compressor as four channels-last implicit-GEMM convolutions (forward).

    x [B, H, W, 768] --1x1 conv + LayerNorm2d--> [B, H, W, 256] --3x3 conv + LayerNorm2d--> [B, H, W, 256]
      --3x3 stride-2 conv--> [B, H/2, W/2, 512] --3x3 stride-2 conv--> [B, H/4 * W/4, 1024] tokens

One kernel serves all four: a program computes a tile of output pixels x output channels, summing
over the taps and input channels with ``tl.dot`` (fp32 accumulation), reading the input through its
strides (the trunk's output as it is: no permute, no copy) and treating taps outside the grid as
zeros (the convs' padding). Where a LayerNorm2d follows, the tile holds every output channel, so the
norm (fp32 statistics, biased variance) is applied before the single store: conv + LN is one pass.
Weights are pre-arranged once as [k, k, C_in, C_out] (the ops layer caches them).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._runtime import launch_grid
from .configs import COMPRESS_BWD, compress_bwd_config, compress_config


@triton.jit
def _conv_nhwc_kernel(
    x_ptr, w_ptr, out_ptr, ln_w_ptr, ln_b_ptr, pre_ptr, stats_ptr,
    stride_xb, stride_xh, stride_xw,
    H, W, Ho, Wo, C_in, C_out, num_pixels, eps,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_LN: tl.constexpr,       # LayerNorm over the output channels (needs BLOCK_N >= C_out)
    SAVE_STATS: tl.constexpr,   # training: also store the conv output before the norm + per-pixel mean, rstd (fp32)
    IEEE_DOT: tl.constexpr,     # fp32 operands: full precision instead of tf32
    UPCAST_DOT: tl.constexpr,   # dot in fp32 (Triton 3.9's interpreter gets bf16 tl.dot wrong)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # output pixels, row-major over (b, y, x)
    valid_m = offs_m < num_pixels
    b = offs_m // (Ho * Wo)
    oy = (offs_m % (Ho * Wo)) // Wo
    ox = offs_m % Wo
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # output channels
    valid_n = offs_n < C_out
    image = b.to(tl.int64) * stride_xb

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(KSIZE * KSIZE):   # a run-time loop: unrolling 9 pipelined K loops spills
        iy = oy * STRIDE - PAD + tap // KSIZE
        ix = ox * STRIDE - PAD + tap % KSIZE
        inside = valid_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)    # outside: the conv's zero padding
        pixel = image + tl.where(inside, iy * stride_xh + ix * stride_xw, 0)
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            valid_k = offs_k < C_in
            a = tl.load(x_ptr + pixel[:, None] + offs_k[None, :], mask=inside[:, None] & valid_k[None, :], other=0.0)
            w = tl.load(w_ptr + (tap * C_in + offs_k)[:, None] * C_out + offs_n[None, :],
                        mask=valid_k[:, None] & valid_n[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=precision)

    if HAS_LN:  # padded channels of acc are exactly 0 and are kept out of the statistics
        mean = tl.sum(acc, 1) / C_out
        centered = tl.where(valid_n[None, :], acc - mean[:, None], 0.0)
        var = tl.sum(centered * centered, 1) / C_out
        rstd = tl.rsqrt(var + eps)
        if SAVE_STATS:
            pre = pre_ptr + offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
            tl.store(pre, acc.to(pre_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])
            tl.store(stats_ptr + offs_m.to(tl.int64) * 2, mean, mask=valid_m)
            tl.store(stats_ptr + offs_m.to(tl.int64) * 2 + 1, rstd, mask=valid_m)
        gamma = tl.load(ln_w_ptr + offs_n, mask=valid_n, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + offs_n, mask=valid_n, other=0.0).to(tl.float32)
        acc = centered * rstd[:, None] * gamma[None, :] + beta[None, :]

    out = out_ptr + offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])


# ---- backward ------------------------------------------------------------------------------------
#
# Saved by the training forward: the input x (the caller's tensor, no copy), the two LN convs'
# outputs before the norm (c1, c2, activation dtype) with their per-pixel mean and rstd (fp32), and
# net_2's output y3. The LN outputs y1 and y2 are recomputed where they are read (the weight
# gradients' input tiles), so no normalised activation is kept: less than the reference keeps
# (it holds c, y and the LN's intermediates for both norms).


@triton.jit
def _conv_nhwc_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr, pre_ptr, stats_ptr, ln_w_ptr, part_ptr,
    H, W, Ho, Wo, C_in, C_out, batch, class_tiles,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    LN_BWD: tl.constexpr,       # the conv's input was a LayerNorm output: return the gradient before the norm
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Input gradient as a transposed conv: dx[p, ci] = sum over taps and co of dy[q, co] W[tap, ci, co]
    with q = (p + PAD - tap) / STRIDE where that is whole and inside the output grid. A program's
    pixels share their position modulo STRIDE (one of STRIDE^2 classes, ``class_tiles`` tiles each),
    so they share the taps that divide: a stride-2 3x3 conv runs 1, 2 or 4 taps, not 9."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"

    cls = pid_m // class_tiles
    py = cls // STRIDE
    px = cls % STRIDE
    Hc = (H - py + STRIDE - 1) // STRIDE                      # the class's pixels: (py + STRIDE i, px + STRIDE j)
    Wc = (W - px + STRIDE - 1) // STRIDE
    offs_c = (pid_m % class_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_c < batch * Hc * Wc
    Wc = tl.maximum(Wc, 1)                                    # an empty class (a side of 1): no division by 0
    Hc = tl.maximum(Hc, 1)
    b = offs_c // (Hc * Wc)
    iy = (offs_c % (Hc * Wc)) // Wc * STRIDE + py
    ix = offs_c % Wc * STRIDE + px
    offs_m = (b * H + iy) * W + ix                            # input pixels, row-major over (b, y, x)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # input channels
    valid_n = offs_n < C_in
    ky0 = (py + PAD) % STRIDE                                 # first tap row / column that divides
    kx0 = (px + PAD) % STRIDE

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ty in range(0, (KSIZE - ky0 + STRIDE - 1) // STRIDE):
        ky = ky0 + ty * STRIDE
        oy = (iy + PAD - ky) // STRIDE                        # exact (maybe negative: masked)
        for tx in range(0, (KSIZE - kx0 + STRIDE - 1) // STRIDE):
            kx = kx0 + tx * STRIDE
            ox = (ix + PAD - kx) // STRIDE
            hit = valid_m & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
            row = tl.where(hit, (b * Ho + oy) * Wo + ox, 0).to(tl.int64) * C_out
            tap = ky * KSIZE + kx
            for k0 in range(0, C_out, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                valid_k = offs_k < C_out
                g = tl.load(dy_ptr + row[:, None] + offs_k[None, :], mask=hit[:, None] & valid_k[None, :], other=0.0)
                w = tl.load(w_ptr + (tap * C_in + offs_n)[None, :] * C_out + offs_k[:, None],
                            mask=valid_k[:, None] & valid_n[None, :], other=0.0)
                if UPCAST_DOT:
                    g = g.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(g, w, acc, input_precision=precision)

    offs_m64 = offs_m.to(tl.int64)
    mask = valid_m[:, None] & valid_n[None, :]
    if LN_BWD:  # one tile holds every channel of its pixels; padded rows and channels are 0 throughout
        c = tl.load(pre_ptr + offs_m64[:, None] * C_in + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + offs_m64 * 2, mask=valid_m, other=0.0)
        rstd = tl.load(stats_ptr + offs_m64 * 2 + 1, mask=valid_m, other=0.0)
        xhat = tl.where(mask, (c - mean[:, None]) * rstd[:, None], 0.0)
        gamma = tl.load(ln_w_ptr + offs_n, mask=valid_n, other=0.0).to(tl.float32)
        # d gamma, d beta: this pixel tile's partial sums, reduced over tiles in a fixed order afterwards
        part = part_ptr + pid_m.to(tl.int64) * 2 * C_in + offs_n
        tl.store(part, tl.sum(acc * xhat, 0), mask=valid_n)
        tl.store(part + C_in, tl.sum(acc, 0), mask=valid_n)
        dxhat = acc * gamma[None, :]
        mean_dxhat = tl.sum(dxhat, 1) / C_in
        mean_dxhat_xhat = tl.sum(dxhat * xhat, 1) / C_in
        acc = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
    tl.store(dx_ptr + offs_m64[:, None] * C_in + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_nhwc_wgrad_kernel(
    x_ptr, dy_ptr, part_ptr, stats_ptr, ln_w_ptr, ln_b_ptr,
    stride_xb, stride_xh, stride_xw,
    stride_ps, stride_pt, stride_pi, stride_po,   # partials [split, tap, C_in, C_out] through strides
    H, W, Ho, Wo, C_in, C_out, num_pixels, pixels_per_split,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    LN_IN: tl.constexpr,        # x holds a LayerNorm's input: normalise it while loading (its output is not kept)
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Weight gradient dW[tap, ci, co] = sum over output pixels q of x[p(q, tap), ci] dy[q, co]: a GEMM
    reducing over pixels, split into fixed pixel ranges; each split writes its own fp32 partial
    (summed afterwards in a fixed order: deterministic, no atomics); a single split writes the
    gradient itself, in the weight's dtype and [C_out, C_in, k, k] layout. 1-D grid."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out, BLOCK_N)
    num_m = tl.cdiv(C_in, BLOCK_M)
    pid_n = pid % num_n
    pid_m = (pid // num_n) % num_m
    tap = (pid // (num_n * num_m)) % (KSIZE * KSIZE)
    split = pid // (num_n * num_m * KSIZE * KSIZE)
    precision: tl.constexpr = "ieee" if IEEE_DOT else "tf32"

    offs_ci = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_ci = offs_ci < C_in
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_co = offs_co < C_out
    if LN_IN:
        gamma = tl.load(ln_w_ptr + offs_ci, mask=valid_ci, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + offs_ci, mask=valid_ci, other=0.0).to(tl.float32)

    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, num_pixels)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)                  # output pixels
        valid_p = offs_p < end
        b = offs_p // (Ho * Wo)
        iy = (offs_p % (Ho * Wo)) // Wo * STRIDE - PAD + tap // KSIZE
        ix = offs_p % Wo * STRIDE - PAD + tap % KSIZE
        inside = valid_p & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        pixel = b.to(tl.int64) * stride_xb + tl.where(inside, iy * stride_xh + ix * stride_xw, 0)
        a_mask = valid_ci[:, None] & inside[None, :]
        a = tl.load(x_ptr + pixel[None, :] + offs_ci[:, None], mask=a_mask, other=0.0)
        if LN_IN:  # the conv's zero padding applies to the norm's output: outside the grid stays 0
            srow = (b.to(tl.int64) * H + tl.where(inside, iy, 0)) * W + tl.where(inside, ix, 0)
            mean = tl.load(stats_ptr + srow * 2, mask=inside, other=0.0)
            rstd = tl.load(stats_ptr + srow * 2 + 1, mask=inside, other=0.0)
            y = (a.to(tl.float32) - mean[None, :]) * rstd[None, :] * gamma[:, None] + beta[:, None]
            a = tl.where(a_mask, y, 0.0).to(x_ptr.dtype.element_ty)   # as the forward stored it
        g = tl.load(dy_ptr + offs_p.to(tl.int64)[:, None] * C_out + offs_co[None, :],
                    mask=valid_p[:, None] & valid_co[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(a, g, acc, input_precision=precision)

    part = part_ptr + split.to(tl.int64) * stride_ps + tap * stride_pt
    tl.store(part + offs_ci[:, None] * stride_pi + offs_co[None, :] * stride_po, acc.to(part_ptr.dtype.element_ty),
             mask=valid_ci[:, None] & valid_co[None, :])


def kernel_for(interpret: bool, kernel=None):
    """The forward conv kernel (or ``kernel``), checked against this process's Triton mode."""
    from ._runtime import check_mode

    return check_mode(_conv_nhwc_kernel if kernel is None else kernel, interpret)


_LAUNCHES: list | None = None


@contextlib.contextmanager
def record_launches():
    """Collect, per launch, the bytes its kernel reads once (input, weights, LN params) and writes."""
    global _LAUNCHES
    _LAUNCHES = []
    try:
        yield _LAUNCHES
    finally:
        _LAUNCHES = None


def _record(config: str, reads, writes) -> None:
    if _LAUNCHES is not None:
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        _LAUNCHES.append(dict(config=config, bytes_read=sum(nbytes(t) for t in reads),
                              bytes_written=sum(nbytes(t) for t in writes)))


def conv_grid(num_pixels: int, c_out: int, cfg: dict):
    """Pixel tiles on x (up to 2^31 - 1), channel tiles on y (a handful)."""
    return launch_grid(triton.cdiv(num_pixels, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))


def _dot_flags(dtype: torch.dtype, interpret: bool) -> dict:
    upcast = interpret and dtype == torch.bfloat16
    return dict(IEEE_DOT=dtype == torch.float32 or upcast, UPCAST_DOT=upcast)


def conv_nhwc(x, weight_kkio, stride: int, pad: int, config: str, ln=None, eps: float = 1e-6, interpret: bool = False,
              save=None):
    """One conv: x [B, H, W, C_in] (unit channel stride), weight [k, k, C_in, C_out]; ``ln`` = (weight,
    bias) of a LayerNorm over the output channels, fused; ``config``: the tile sizes' name in configs.
    ``save`` = (pre [B, Ho, Wo, C_out], stats fp32 [B * Ho * Wo, 2]): buffers the LN step also fills
    with its conv output before the norm and each pixel's mean and rstd (for the backward)."""
    B, H, W, C_in = x.shape
    ksize, C_out = weight_kkio.shape[0], weight_kkio.shape[-1]
    Ho, Wo = (H + 2 * pad - ksize) // stride + 1, (W + 2 * pad - ksize) // stride + 1
    out = torch.empty(B, Ho, Wo, C_out, device=x.device, dtype=x.dtype)
    cfg = (compress_bwd_config(config, C_out) if config in COMPRESS_BWD
           else compress_config(config, C_out, x.device))   # the device's tuned config, if any
    if ln is not None and cfg["BLOCK_N"] < C_out:
        raise ValueError(f"config {config!r} tiles {cfg['BLOCK_N']} < {C_out} output channels: cannot fuse the LayerNorm")
    num_pixels = B * Ho * Wo
    grid = conv_grid(num_pixels, C_out, cfg)
    ln_w, ln_b = ln if ln is not None else (weight_kkio, weight_kkio)   # never read without HAS_LN
    pre, stats = save if save is not None else (out, out)               # never written without SAVE_STATS
    kernel_for(interpret)[grid](
        x, weight_kkio, out, ln_w, ln_b, pre, stats,
        x.stride(0), x.stride(1), x.stride(2),
        H, W, Ho, Wo, C_in, C_out, num_pixels, eps,
        KSIZE=ksize, STRIDE=stride, PAD=pad, HAS_LN=ln is not None, SAVE_STATS=save is not None,
        **_dot_flags(x.dtype, interpret), **cfg,
    )
    _record(config, (x, weight_kkio) + ((ln_w, ln_b) if ln else ()), (out,) + (tuple(save) if save is not None else ()))
    return out


def dgrad_grid(batch: int, H: int, W: int, stride: int, c_in: int, cfg: dict):
    """Input-gradient launch: the stride^2 parity classes' pixel tiles on x (each class as many tiles as
    the largest), channel tiles on y."""
    class_tiles = triton.cdiv(batch * triton.cdiv(H, stride) * triton.cdiv(W, stride), cfg["BLOCK_M"])
    return launch_grid(stride * stride * class_tiles, triton.cdiv(c_in, cfg["BLOCK_N"]))


def conv_dgrad(dy, weight_kkio, in_hw: tuple[int, int], stride: int, pad: int, config: str, ln=None,
               interpret: bool = False):
    """Input gradient of one conv: dy [B, Ho, Wo, C_out] contiguous -> dx [B, H, W, C_in].
    ``ln`` = (pre, stats, gamma) when the conv's input was a LayerNorm output: returns the gradient
    of the norm's input instead, and the fp32 partials [pixel tiles, 2, C_in] of d gamma, d beta."""
    B, Ho, Wo, C_out = dy.shape
    H, W = in_hw
    ksize, C_in = weight_kkio.shape[0], weight_kkio.shape[2]
    dx = torch.empty(B, H, W, C_in, device=dy.device, dtype=dy.dtype)
    cfg = compress_bwd_config(config, C_in)
    if ln is not None and cfg["BLOCK_N"] < C_in:
        raise ValueError(f"config {config!r} tiles {cfg['BLOCK_N']} < {C_in} channels: cannot fuse the LayerNorm backward")
    grid = dgrad_grid(B, H, W, stride, C_in, cfg)
    class_tiles = grid[0] // (stride * stride)
    if ln is not None:
        pre, stats, gamma = ln
        part = torch.empty(grid[0], 2, C_in, device=dy.device, dtype=torch.float32)
    else:
        pre = stats = gamma = part = dx                                 # never touched without LN_BWD
    kernel_for(interpret, _conv_nhwc_dgrad_kernel)[grid](
        dy, weight_kkio, dx, pre, stats, gamma, part,
        H, W, Ho, Wo, C_in, C_out, B, class_tiles,
        KSIZE=ksize, STRIDE=stride, PAD=pad, LN_BWD=ln is not None, **_dot_flags(dy.dtype, interpret), **cfg,
    )
    _record(config, (dy, weight_kkio) + ((pre, stats, gamma) if ln else ()), (dx,) + ((part,) if ln else ()))
    return (dx, part) if ln is not None else dx


def wgrad_splits(num_pixels: int, programs_per_split: int, cfg: dict) -> tuple[int, int]:
    """(splits, pixels per split) of the weight gradient's pixel reduction, from shapes alone: enough
    programs to fill a GPU (``cfg["PROGRAMS"]``), each split at least ``cfg["MIN_PIXELS"]`` pixels, at most
    ``cfg["MAX_SPLITS"]`` splits (each holds an fp32 copy of the weight gradient)."""
    chunk = cfg["BLOCK_K"]
    want = max(1, min(triton.cdiv(cfg["PROGRAMS"], programs_per_split), num_pixels // cfg["MIN_PIXELS"], cfg["MAX_SPLITS"]))
    per_split = triton.cdiv(triton.cdiv(num_pixels, want), chunk) * chunk
    return triton.cdiv(num_pixels, per_split), per_split


def wgrad_grid(num_pixels: int, ksize: int, c_in: int, c_out: int, cfg: dict):
    tiles = ksize * ksize * triton.cdiv(c_in, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"])
    splits, per_split = wgrad_splits(num_pixels, tiles, cfg)
    return launch_grid(splits * tiles), splits, per_split


def conv_wgrad(x, dy, ksize: int, stride: int, pad: int, config: str, ln=None, interpret: bool = False,
               out_dtype: torch.dtype | None = None):
    """Weight gradient of one conv, [C_out, C_in, k, k] in ``out_dtype`` (default x's): x [B, H, W, C_in]
    (unit channel stride; with ``ln`` = (stats, gamma, beta) it holds the LayerNorm's input, normalised
    while read), dy [B, Ho, Wo, C_out] contiguous."""
    B, H, W, C_in = x.shape
    _, Ho, Wo, C_out = dy.shape
    cfg = compress_bwd_config(config, C_out)
    num_pixels = B * Ho * Wo
    grid, splits, per_split = wgrad_grid(num_pixels, ksize, C_in, C_out, cfg)
    dw = torch.empty(C_out, C_in, ksize, ksize, device=x.device, dtype=out_dtype or x.dtype)
    if splits == 1:   # the kernel writes the gradient itself
        part, strides = dw, (0, 1, ksize * ksize, C_in * ksize * ksize)
    else:             # fp32 partials, split-major
        part = torch.empty(splits, ksize * ksize, C_in, C_out, device=x.device, dtype=torch.float32)
        strides = part.stride()
    stats, gamma, beta = ln if ln is not None else (part, part, part)   # never read without LN_IN
    launch = {k: v for k, v in cfg.items() if k not in ("PROGRAMS", "MIN_PIXELS", "MAX_SPLITS")}
    kernel_for(interpret, _conv_nhwc_wgrad_kernel)[grid](
        x, dy, part, stats, gamma, beta,
        x.stride(0), x.stride(1), x.stride(2), *strides,
        H, W, Ho, Wo, C_in, C_out, num_pixels, per_split,
        KSIZE=ksize, STRIDE=stride, PAD=pad, LN_IN=ln is not None, **_dot_flags(x.dtype, interpret), **launch,
    )
    _record(config, (x, dy) + (tuple(ln) if ln else ()), (part,))
    if splits > 1:   # the splits summed in a fixed order, in place (no further buffer)
        for i in range(1, splits):
            part[0].add_(part[i])
        dw.copy_(part[0].view(ksize, ksize, C_in, C_out).permute(3, 2, 0, 1))
    return dw


def _chain_shapes(H: int, W: int):
    half = lambda n: (n + 1) // 2  # 3x3, stride 2, pad 1  # noqa: E731
    return (half(H), half(W)), (half(half(H)), half(half(W)))


def compress_fwd(x, neck0, ln1_w, ln1_b, neck2, ln3_w, ln3_b, net2, net3, eps: float, interpret: bool = False,
                 train: bool = False):
    """The chain on validated inputs; conv weights already [k, k, C_in, C_out]. Returns [B, h*w, C3];
    with ``train`` also what the backward needs: (tokens, c1, stats1, c2, stats2, y3)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, W, _ = x.shape
    saved = []
    if train:
        for w in (neck0, neck2):
            saved.append((torch.empty(B, H, W, w.shape[-1], device=x.device, dtype=x.dtype),
                          torch.empty(B * H * W, 2, device=x.device, dtype=torch.float32)))
    save = "_save" if train else ""
    y = conv_nhwc(x, neck0, 1, 0, "neck_1x1_ln" + save, (ln1_w, ln1_b), eps, interpret, saved[0] if train else None)
    y = conv_nhwc(y, neck2, 1, 1, "neck_3x3_ln" + save, (ln3_w, ln3_b), eps, interpret, saved[1] if train else None)
    y3 = conv_nhwc(y, net2, 2, 1, "net2_3x3_s2", interpret=interpret)
    y = conv_nhwc(y3, net3, 2, 1, "net3_3x3_s2", interpret=interpret)
    tokens = y.view(y.shape[0], y.shape[1] * y.shape[2], y.shape[3])
    if not train:
        return tokens
    (c1, stats1), (c2, stats2) = saved
    return tokens, c1, stats1, c2, stats2, y3


def compress_bwd(grad, x, neck0, ln1_w, ln1_b, neck2, ln3_w, ln3_b, net2, net3, c1, stats1, c2, stats2, y3,
                 interpret: bool = False):
    """Gradients of the chain from the tokens' gradient [B, h*w, C3] and the training forward's saved
    tensors: dx [B, H, W, C_in] and each parameter's, in its shape ([C_out, C_in, k, k] for the convs)
    and x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, W, _ = x.shape
    (H2, W2), (h, w) = _chain_shapes(H, W)
    dy4 = grad.contiguous().view(B, h, w, net3.shape[-1])
    d_net3 = conv_wgrad(y3, dy4, 3, 2, 1, "net3_wgrad", interpret=interpret)
    dy3 = conv_dgrad(dy4, net3, (H2, W2), 2, 1, "net3_dgrad", interpret=interpret)
    d_net2 = conv_wgrad(c2, dy3, 3, 2, 1, "net2_wgrad", (stats2, ln3_w, ln3_b), interpret=interpret)
    dc2, part3 = conv_dgrad(dy3, net2, (H, W), 2, 1, "net2_dgrad_ln", (c2, stats2, ln3_w), interpret=interpret)
    d_neck2 = conv_wgrad(c1, dc2, 3, 1, 1, "neck_3x3_wgrad", (stats1, ln1_w, ln1_b), interpret=interpret)
    dc1, part1 = conv_dgrad(dc2, neck2, (H, W), 1, 1, "neck_3x3_dgrad_ln", (c1, stats1, ln1_w), interpret=interpret)
    d_neck0 = conv_wgrad(x, dc1, 1, 1, 0, "neck_1x1_wgrad", interpret=interpret)
    dx = conv_dgrad(dc1, neck0, (H, W), 1, 0, "neck_1x1_dgrad", interpret=interpret)
    # d gamma, d beta: the pixel tiles' partials summed in a fixed order
    ln = [p.sum(0).to(x.dtype) for p in (part1[:, 0], part1[:, 1], part3[:, 0], part3[:, 1])]
    return dx, d_neck0, ln[0], ln[1], d_neck2, ln[2], ln[3], d_net2, d_net3
