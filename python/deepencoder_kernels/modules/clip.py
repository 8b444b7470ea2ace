"""CLIP-large over SAM's compressed grid, DeepSeek-OCR names (``vision_model.*``)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import config as cfg
from .. import ops
from .packing import Packing
from .sam import resize_abs_pos


def resize_clip_pos(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """[1 + G*G, C] -> [tokens, C]: the grid part bicubic-resized in fp32, CLS position kept."""
    if pos.shape[0] == tokens:
        return pos
    g, side = math.isqrt(pos.shape[0] - 1), math.isqrt(tokens - 1)
    grid = resize_abs_pos(pos[1:].reshape(1, g, g, -1), side)
    return torch.cat([pos[:1], grid.reshape(side * side, -1)])


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class ClipEmbeddings(nn.Module):
    def __init__(self, dim: int = cfg.CLIP_DIM):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(3, dim, cfg.CLIP_PATCH, cfg.CLIP_PATCH, bias=False)  # unused
        n = cfg.CLIP_POS_GRID**2 + 1
        self.position_embedding = nn.Embedding(n, dim)
        self.register_buffer("position_ids", torch.arange(n)[None], persistent=False)

    def forward(self, tokens):
        """tokens [B, h*w, C] (SAM's compressed grid, row-major) -> [B, h*w + 1, C]."""
        cls = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        x = torch.cat([cls, tokens], dim=1)
        pos = resize_clip_pos(self.position_embedding(self.position_ids)[0], x.shape[1])
        return x + pos


class ClipAttention(nn.Module):
    """Global softmax attention with a fused qkv_proj, run as packed sequences."""

    def __init__(self, dim: int = cfg.CLIP_DIM, num_heads: int = cfg.CLIP_HEADS):
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        """x: [B, N, C] (equal lengths) or packed [total, C] with cu_seqlens/max_seqlen."""
        shape = x.shape
        if cu_seqlens is None:
            B, N, _ = shape
            cu_seqlens = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=x.device)
            max_seqlen = N
            x = x.reshape(B * N, -1)
        q, k, v = self.qkv_proj(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, check_values=False)
        return self.out_proj(out.reshape(x.shape[0], -1)).view(shape)


class ClipMLP(nn.Module):
    def __init__(self, dim: int = cfg.CLIP_DIM, hidden: int = cfg.CLIP_MLP_DIM):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=cfg.CLIP_LN_EPS)
        self.self_attn = ClipAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=cfg.CLIP_LN_EPS)
        self.mlp = ClipMLP(dim, hidden)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(dim, num_heads, hidden) for _ in range(depth))

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        return x


class ClipVisionModel(nn.Module):
    """``vision_model(pixels, sam_features) -> [B, h*w + 1, 1024]``; no final LayerNorm."""

    def __init__(self, dim: int = cfg.CLIP_DIM, depth: int = cfg.CLIP_DEPTH, num_heads: int = cfg.CLIP_HEADS,
                 hidden: int = cfg.CLIP_MLP_DIM):
        super().__init__()
        self.embeddings = ClipEmbeddings(dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=cfg.CLIP_LN_EPS)  # (sic) checkpoint spelling
        self.transformer = ClipTransformer(dim, depth, num_heads, hidden)

    def from_tokens(self, tokens):
        """SAM tokens [B, h*w, C] -> [B, h*w + 1, C]."""
        return self.transformer(self.pre_layrnorm(self.embeddings(tokens)))

    def from_token_groups(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Grids of several sizes at once (``groups[g]``: [B_g, n_g, C]): one packed pass through
        the transformer, every view its own sequence of n_g + 1 tokens. Returns [B_g, n_g + 1, C] each."""
        embedded = [self.pre_layrnorm(self.embeddings(t)) for t in groups]
        packing = Packing.of_lengths([e.shape[1] for e in embedded for _ in range(e.shape[0])], groups[0].device)
        packed = self.transformer(torch.cat([e.reshape(-1, e.shape[-1]) for e in embedded]), packing.cu_seqlens,
                                  packing.max_seqlen)
        return [part.view(e.shape) for part, e in zip(packed.split([e.shape[0] * e.shape[1] for e in embedded]), embedded)]

    def forward(self, pixels, sam_features):
        """Upstream's call contract: ``pixels`` is unused (the patch embedding is replaced)."""
        return self.from_tokens(sam_features.flatten(2).transpose(1, 2))
