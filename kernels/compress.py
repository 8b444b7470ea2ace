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
from .configs import compress_config


@triton.jit
def _conv_nhwc_kernel(
    x_ptr, w_ptr, out_ptr, ln_w_ptr, ln_b_ptr,
    stride_xb, stride_xh, stride_xw,
    H, W, Ho, Wo, C_in, C_out, num_pixels, eps,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_LN: tl.constexpr,       # LayerNorm over the output channels (needs BLOCK_N >= C_out)
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
        gamma = tl.load(ln_w_ptr + offs_n, mask=valid_n, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + offs_n, mask=valid_n, other=0.0).to(tl.float32)
        acc = centered * tl.rsqrt(var + eps)[:, None] * gamma[None, :] + beta[None, :]

    out = out_ptr + offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])


def kernel_for(interpret: bool):
    from ._runtime import check_mode

    return check_mode(_conv_nhwc_kernel, interpret)


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


def conv_grid(num_pixels: int, c_out: int, cfg: dict):
    """Pixel tiles on x (up to 2^31 - 1), channel tiles on y (a handful)."""
    return launch_grid(triton.cdiv(num_pixels, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))


def conv_nhwc(x, weight_kkio, stride: int, pad: int, config: str, ln=None, eps: float = 1e-6, interpret: bool = False):
    """One conv: x [B, H, W, C_in] (unit channel stride), weight [k, k, C_in, C_out]; ``ln`` = (weight,
    bias) of a LayerNorm over the output channels, fused; ``config``: the tile sizes' name in configs."""
    B, H, W, C_in = x.shape
    ksize, C_out = weight_kkio.shape[0], weight_kkio.shape[-1]
    Ho, Wo = (H + 2 * pad - ksize) // stride + 1, (W + 2 * pad - ksize) // stride + 1
    out = torch.empty(B, Ho, Wo, C_out, device=x.device, dtype=x.dtype)
    cfg = compress_config(config, C_out)
    if ln is not None and cfg["BLOCK_N"] < C_out:
        raise ValueError(f"config {config!r} tiles {cfg['BLOCK_N']} < {C_out} output channels: cannot fuse the LayerNorm")
    num_pixels = B * Ho * Wo
    grid = conv_grid(num_pixels, C_out, cfg)
    upcast = interpret and x.dtype == torch.bfloat16
    ln_w, ln_b = ln if ln is not None else (weight_kkio, weight_kkio)   # never read without HAS_LN
    kernel_for(interpret)[grid](
        x, weight_kkio, out, ln_w, ln_b,
        x.stride(0), x.stride(1), x.stride(2),
        H, W, Ho, Wo, C_in, C_out, num_pixels, eps,
        KSIZE=ksize, STRIDE=stride, PAD=pad, HAS_LN=ln is not None,
        IEEE_DOT=x.dtype == torch.float32 or upcast, UPCAST_DOT=upcast, **cfg,
    )
    if _LAUNCHES is not None:
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        _LAUNCHES.append(dict(config=config, bytes_read=nbytes(x) + nbytes(weight_kkio) + (nbytes(ln_w) + nbytes(ln_b) if ln else 0),
                              bytes_written=nbytes(out)))
    return out


def compress_fwd(x, neck0, ln1_w, ln1_b, neck2, ln3_w, ln3_b, net2, net3, eps: float, interpret: bool = False):
    """The chain on validated inputs; conv weights already [k, k, C_in, C_out]. Returns [B, h*w, C3]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = conv_nhwc(x, neck0, 1, 0, "neck_1x1_ln", (ln1_w, ln1_b), eps, interpret)
    y = conv_nhwc(y, neck2, 1, 1, "neck_3x3_ln", (ln3_w, ln3_b), eps, interpret)
    y = conv_nhwc(y, net2, 2, 1, "net2_3x3_s2", interpret=interpret)
    y = conv_nhwc(y, net3, 2, 1, "net3_3x3_s2", interpret=interpret)
    return y.view(y.shape[0], y.shape[1] * y.shape[2], y.shape[3])
