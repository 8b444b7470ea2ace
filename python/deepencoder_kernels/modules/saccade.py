"""Saccades: score every SAM trunk position, keep a per-view budget of the best ones and turn their
features into extra tokens that follow the base tokens.

This is new (DeepSeek-OCR has no such head, so its weights are not in the checkpoint): a small
relevance scorer over the 768-d trunk features, optionally query-aware, and a projection into the
projector's 1280-d token space with a learned position table over the trunk grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import config as cfg
from .. import ops
from .sam import resize_abs_pos


def base_token_count(side: int) -> int:
    """Tokens of one view in upstream's layout for a trunk grid of ``side`` (64 -> 16x16 + 16 newlines + 1 = 273)."""
    g = cfg.compressed_side(side)
    return g * (g + 1) + 1


class SaccadeSelector(nn.Module):
    """``scores = content(LN(f))``, plus ``<Wq q, Wk LN(f)> / sqrt(d)`` given a query embedding.

    Budget per view: ``k`` if given, else ``budget_ratio`` x the view's base token count (73 Tiny,
    111 Small, 273 Base, 421 Large at ratio 1), at most the number of positions. In training the
    scores get gradients through the straight-through estimator of ``ops.saccade_gather``.
    """

    def __init__(self, feature_dim: int = cfg.SAM_DIM, out_dim: int = cfg.PROJ_OUT, query_dim: int | None = None,
                 key_dim: int = 256, pos_grid: int = cfg.SAM_POS_GRID, budget_ratio: float = 1.0):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.content = nn.Linear(feature_dim, 1)
        self.query_proj = nn.Linear(query_dim, key_dim) if query_dim else None
        self.key_proj = nn.Linear(feature_dim, key_dim) if query_dim else None
        self.proj = nn.Linear(feature_dim, out_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid, pos_grid, out_dim))
        self.budget_ratio = budget_ratio

    def budget(self, side: int) -> int:
        return min(side * side, round(self.budget_ratio * base_token_count(side)))

    def scores(self, normed: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """normed [B, N, C] -> fp32 [B, N]."""
        s = self.content(normed).squeeze(-1).float()
        if query is not None:
            if self.query_proj is None:
                raise ValueError("query given, but this SaccadeSelector was built without query_dim")
            q = self.query_proj(query.to(normed.dtype))                          # [B, d]
            s = s + torch.einsum("bnd,bd->bn", self.key_proj(normed), q).float() / math.sqrt(q.shape[-1])
        return s.contiguous()

    def forward(self, trunk: torch.Tensor, k: int | torch.Tensor | None = None, query: torch.Tensor | None = None,
                order: str = "spatial"):
        """trunk [B, H, W, C] -> (tokens [sum k, out_dim], positions int64 [sum k], cu_seqlens int32 [B + 1])."""
        B, H, W, C = trunk.shape
        if H != W:
            raise ValueError(f"trunk must be a square grid [B, H, H, C], got {list(trunk.shape)}")
        normed = self.norm(trunk.reshape(B, H * W, C))
        budget = self.budget(H) if k is None else k
        grad = "straight_through" if self.training else "none"
        gathered, positions, cu = ops.saccade_gather(self.scores(normed, query), normed, budget, order=order,
                                                     score_grad=grad)
        pos = resize_abs_pos(self.pos_embed, H).reshape(H * W, -1)
        return self.proj(gathered) + pos[positions].to(gathered.dtype), positions, cu
