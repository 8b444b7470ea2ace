"""SAM-base trunk + neck/compressor with DeepSeek-OCR's parameter names (``sam_model.*``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as cfg
from .. import ops
from .packing import Packing
from ..reference import layer_norm_2d
from ..stages import nvtx_stage


def check_pixels(pixels, name: str = "pixels") -> int:
    """``pixels`` must be [B, 3, S, S] with S a multiple of 16 (upstream resizes ``pos_embed`` to a
    square grid, so views are square); returns S."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
        shape = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"{name} must be [B, 3, S, S], got {shape}")
    H, W = pixels.shape[-2:]
    if H != W:
        raise ValueError(f"{name} must be square (upstream's SAM resizes its positions to a square grid), got {H}x{W}")
    return cfg.check_image_size(int(H), f"{name}'s side")


def resize_abs_pos(pos_embed: torch.Tensor, size: int) -> torch.Tensor:
    """[1, G, G, C] -> [1, size, size, C]: bicubic, antialias, in fp32, cast back (upstream rule)."""
    if pos_embed.shape[1] == size:
        return pos_embed
    grid = pos_embed.permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (biased variance)."""

    def __init__(self, channels: int, eps: float = cfg.SAM_LN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        return layer_norm_2d(x, self.weight, self.bias, self.eps)


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.SAM_DIM, cfg.SAM_PATCH, cfg.SAM_PATCH)

    def forward(self, pixels):
        return self.proj(pixels).permute(0, 2, 3, 1)  # channels-last [B, H, W, C]


class RelPosAttention(nn.Module):
    """SAM attention: qkv Linear, rel-pos attention (windowed or global), proj Linear."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, dim // num_heads))

    def forward(self, x: torch.Tensor, window_size: int = 0, packing: Packing | None = None) -> torch.Tensor:
        """x [B, H, W, C]; or packed grids [total, C] with ``packing`` (global attention per grid)."""
        # qkv runs on the real tokens only: upstream's zero-padded tokens come out of the qkv
        # Linear as exactly its bias, which the op takes as ``pad_kv``.
        qkv = self.qkv(x)
        if packing is None:
            out = ops.rel_pos_attention(qkv, self.rel_pos_h, self.rel_pos_w, self.num_heads, window_size, self.qkv.bias)
            return self.proj(out)
        if window_size:
            raise ValueError("packed grids run global attention only (window_size must be 0)")
        q, k, v = qkv.view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        out = ops.varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, rel_pos_h=self.rel_pos_h,
                                   rel_pos_w=self.rel_pos_w, grid_hw=packing.grid_hw, check_values=False,
                                   max_side=packing.max_side)
        return self.proj(out.reshape(x.shape))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, rel_pos_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.SAM_LN_EPS)
        self.attn = RelPosAttention(dim, num_heads, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.SAM_LN_EPS)
        self.mlp = MLPBlock(dim, cfg.SAM_MLP_DIM if dim == cfg.SAM_DIM else 4 * dim)

    def forward(self, x, packing: Packing | None = None):
        """x [B, H, W, C], or packed grids [total, C] with ``packing`` (global blocks)."""
        x = x + self.attn(self.norm1(x), self.window_size, packing)
        return x + self.mlp(self.norm2(x))


class CompressorParts:
    """``neck`` (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d), ``net_2`` and ``net_3`` (3x3 stride-2
    convs) with the checkpoint's names, and the op that runs them on channels-last input."""

    def _build_compressor(self, dim: int, neck_dim: int, out_dim: int, net2_dim: int | None = None) -> None:
        """``net2_dim``: net_2's channels (None: out_dim // 2, as v1's 512 -> 1024; V2 keeps 512 -> 896)."""
        self.neck = nn.Sequential(
            nn.Conv2d(dim, neck_dim, 1, bias=False),
            LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, 3, padding=1, bias=False),
            LayerNorm2d(neck_dim),
        )
        net2_dim = out_dim // 2 if net2_dim is None else net2_dim
        self.net_2 = nn.Conv2d(neck_dim, net2_dim, 3, 2, 1, bias=False)
        self.net_3 = nn.Conv2d(net2_dim, out_dim, 3, 2, 1, bias=False)

    def compress(self, x):
        """Trunk output [B, H, W, C] (channels-last, as it is) -> tokens [B, h*w, out_dim] (1024 v1, 896 V2)."""
        n0, n1, n2, n3 = self.neck
        return ops.compress(x, n0.weight, n1.weight, n1.bias, n2.weight, n3.weight, n3.bias,
                            self.net_2.weight, self.net_3.weight, n1.eps)


class Compressor(CompressorParts, nn.Module):
    """Drop-in neck + compressor: loads ``sam_model.neck.*``, ``sam_model.net_2.*`` and
    ``sam_model.net_3.*`` (prefix stripped) as they are; ``forward(x [B, H, W, 768]) -> [B, h*w, 1024]``."""

    def __init__(self, dim: int = cfg.SAM_DIM, neck_dim: int = cfg.SAM_NECK_DIM, out_dim: int = cfg.SAM_OUT_DIM,
                 net2_dim: int | None = None):
        super().__init__()
        self._build_compressor(dim, neck_dim, out_dim, net2_dim)

    def forward(self, x):
        return self.compress(x)


class SamEncoder(CompressorParts, nn.Module):
    """``sam_model``: pixels [B, 3, S, S] -> features [B, out_dim, g, g] (a channels-last view), with
    g = ``cfg.compressed_grid(S)`` = ceil(ceil((S / 16) / 2) / 2), as upstream's convs give it.
    One trunk for both generations: v1's net_3 gives 1024 channels, V2's 896 (``out_dim``,
    ``net2_dim=512``); nothing else differs (DeepSeek-OCR 2's ``sam_vary_sdpa.py``).

    The width/depth arguments exist so tests can build small models with the same code paths.
    """

    def __init__(
        self,
        dim: int = cfg.SAM_DIM,
        depth: int = cfg.SAM_DEPTH,
        num_heads: int = cfg.SAM_HEADS,
        window_size: int = cfg.SAM_WINDOW,
        global_blocks=cfg.SAM_GLOBAL_BLOCKS,
        neck_dim: int = cfg.SAM_NECK_DIM,
        out_dim: int = cfg.SAM_OUT_DIM,
        net2_dim: int | None = None,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed()
        if dim != cfg.SAM_DIM:
            self.patch_embed.proj = nn.Conv2d(3, dim, cfg.SAM_PATCH, cfg.SAM_PATCH)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.SAM_POS_GRID, cfg.SAM_POS_GRID, dim))
        self.blocks = nn.ModuleList(
            SamBlock(
                dim,
                num_heads,
                0 if i in global_blocks else window_size,
                cfg.SAM_POS_GRID if i in global_blocks else window_size,
            )
            for i in range(depth)
        )
        self._build_compressor(dim, neck_dim, out_dim, net2_dim)

    def embed(self, pixels):
        x = self.patch_embed(pixels)
        return x + resize_abs_pos(self.pos_embed, x.shape[1])

    def trunk(self, pixels, stage=nvtx_stage):
        """pixels [B, 3, S, S] -> trunk features [B, S/16, S/16, 768]; ``stage`` wraps each stage's work."""
        side = cfg.sam_grid(check_pixels(pixels))
        n = side * side
        with stage("patch embed", pixels.shape[-1] * pixels.shape[-2], n):
            x = self.embed(pixels)
        for blk in self.blocks:
            with stage("windowed blocks" if blk.window_size else "global blocks", n, n):
                x = blk(x)
        return x

    def trunk_groups(self, pixel_groups: list[torch.Tensor], stage=nvtx_stage) -> list[torch.Tensor]:
        """Views of several sizes at once: ``pixel_groups[g]`` is [B_g, 3, S_g, S_g]. Windowed blocks
        run per group (same-size views batch as they are); each global block runs once over every
        view's grid, packed, through the varlen attention with per-grid rel-pos. Returns the trunk
        features per group, as :meth:`trunk` would give for each group alone."""
        xs = []
        for i, pixels in enumerate(pixel_groups):
            side = cfg.sam_grid(check_pixels(pixels, f"pixel_groups[{i}]"))
            with stage("patch embed", pixels.shape[-1] * pixels.shape[-2], side * side):
                xs.append(self.embed(pixels))
        grids = [(x.shape[1], x.shape[2]) for x in xs for _ in range(x.shape[0])]
        packing = Packing.of_grids(grids, xs[0].device)
        n = sum(h * w for h, w in grids)
        for blk in self.blocks:
            if blk.window_size:
                with stage("windowed blocks", n, n):
                    xs = [blk(x) for x in xs]
                continue
            with stage("global blocks", n, n):
                packed = blk(torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), packing)
                xs = [part.view(x.shape) for part, x in zip(packed.split([x[..., 0].numel() for x in xs]), xs)]
        return xs

    def tokens(self, pixels, stage=nvtx_stage, trunk: torch.Tensor | None = None):
        """pixels [B, 3, S, S] (or their ``trunk`` features) -> tokens [B, g * g, 1024], g = cfg.compressed_grid(S)."""
        x = self.trunk(pixels, stage) if trunk is None else trunk
        n = x.shape[1] * x.shape[2]
        with stage("neck+compressor", n, cfg.compressed_side(x.shape[1]) * cfg.compressed_side(x.shape[2])):
            return self.compress(x)

    def forward(self, pixels):
        t = self.tokens(pixels)
        side = cfg.compressed_grid(pixels.shape[-1])
        return t.view(t.shape[0], side, side, -1).permute(0, 3, 1, 2)
