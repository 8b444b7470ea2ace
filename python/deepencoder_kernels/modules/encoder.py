"""DeepEncoder: SAM trunk -> compressor -> CLIP -> concat -> projector -> token layout."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import config as cfg
from ..preprocess import Views, preprocess
from ..stages import nvtx_stage
from .clip import ClipVisionModel
from .saccade import SaccadeSelector
from .sam import SamEncoder, check_pixels


class MlpProjector(nn.Module):
    """``projector.layers``: one Linear 2048 -> 1280."""

    def __init__(self, in_dim: int = cfg.PROJ_IN, out_dim: int = cfg.PROJ_OUT):
        super().__init__()
        self.layers = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.layers(x)


class DeepEncoder(nn.Module):
    """The vision side of DeepSeek-OCR, with the checkpoint's names (no ``model.`` prefix).

    ``sam_model(pixels) -> [B, 1024, h, w]``, ``vision_model(pixels, sam_features)``,
    ``projector(x)``, ``image_newline`` and ``view_seperator`` (sic) as upstream has them.

    ``saccades``: an optional :class:`SaccadeSelector`; with one, each image's tokens are followed by
    the saccade tokens of its global view (not part of the DeepSeek-OCR checkpoint).
    """

    def __init__(self, sam: SamEncoder | None = None, clip: ClipVisionModel | None = None,
                 projector: MlpProjector | None = None, saccades: SaccadeSelector | None = None):
        super().__init__()
        self.sam_model = sam or SamEncoder()
        self.vision_model = clip or ClipVisionModel()
        self.projector = projector or MlpProjector()
        dim = self.projector.layers.out_features
        self.image_newline = nn.Parameter(torch.zeros(dim))
        self.view_seperator = nn.Parameter(torch.zeros(dim))
        self.saccades = saccades

    # -- weights ---------------------------------------------------------------------------
    def load_checkpoint(self, path, strict: bool = True):
        from ..checkpoint import load_checkpoint

        return load_checkpoint(self, path, strict=strict)

    # -- one batch of same-size views -------------------------------------------------------
    def view_features(self, pixels: torch.Tensor, stage=nvtx_stage, trunk: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, S, S] (or their SAM ``trunk`` features) -> projected grid features [B, h*w, 1280] (no newlines)."""
        sam_tokens = self.sam_model.tokens(pixels, stage, trunk)       # [B, h*w, 1024]
        n = sam_tokens.shape[1]
        with stage("CLIP", n, n + 1):
            clip_tokens = self.vision_model.from_tokens(sam_tokens)    # [B, h*w + 1, 1024]
        with stage("projector", n, n):
            return self.projector(torch.cat([clip_tokens[:, 1:], sam_tokens], dim=-1))

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, D] -> [rows * (cols + 1), D]: image_newline after every row."""
        rows, _, D = grid.shape
        newline = self.image_newline.to(grid.dtype).expand(rows, 1, D)
        return torch.cat([grid, newline], dim=1).reshape(-1, D)

    def layout(self, global_feats: torch.Tensor, tile_feats: torch.Tensor | None = None,
               grid: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """Upstream's token order: [tile grid rows + newlines], [global rows + newlines], separator."""
        D = global_feats.shape[-1]
        g = math.isqrt(global_feats.shape[0])
        parts = []
        if tile_feats is not None:
            n_w, n_h = grid
            t = math.isqrt(tile_feats.shape[1])
            # [n_h, n_w, t, t, D] -> rows that run across the tiles of one tile row
            local = tile_feats.view(n_h, n_w, t, t, D).permute(0, 2, 1, 3, 4).reshape(n_h * t, n_w * t, D)
            parts.append(self.with_newlines(local))
        parts.append(self.with_newlines(global_feats.view(g, g, D)))
        parts.append(self.view_seperator.to(global_feats.dtype)[None])
        return torch.cat(parts)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed views [B, 3, S, S] in [-1, 1] -> [B, h*(w+1) + 1, 1280]."""
        check_pixels(pixels)     # square, a multiple of 16 (any size upstream's SAM takes)
        feats = self.view_features(pixels)
        return torch.stack([self.layout(f) for f in feats])

    def encode_views(self, views: Views, stage=nvtx_stage, query: torch.Tensor | None = None) -> torch.Tensor:
        """One image's views -> its tokens in upstream's layout (then its saccade tokens, if any)."""
        dtype = self.projector.layers.weight.dtype
        device = self.projector.layers.weight.device
        pixels = views.global_view[None].to(device, dtype)
        trunk = self.sam_model.trunk(pixels, stage)
        global_feats = self.view_features(pixels, stage, trunk)[0]
        tile_feats = None
        if views.tiles is not None:
            tile_feats = self.view_features(views.tiles.to(device, dtype), stage)
        tokens = self.layout(global_feats, tile_feats, views.grid)
        if self.saccades is None:
            return tokens
        return torch.cat([tokens, self._saccade_tokens(trunk, query, stage).to(tokens.dtype)])

    def encode_views_packed(self, batch: list[Views], stage=nvtx_stage, query: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Many images' views (any mix of modes, Gundam tiles included) as one batch: views grouped
        by size through SAM (global blocks packed across all sizes), every compressed grid packed
        into one token stream for CLIP, then the projector. Returns each image's tokens as
        :meth:`encode_views` gives them."""
        dtype = self.projector.layers.weight.dtype
        device = self.projector.layers.weight.device
        groups: dict[int, list[tuple[int, int, torch.Tensor]]] = {}   # side -> (image, tile or -1, pixels)
        for i, views in enumerate(batch):
            groups.setdefault(views.global_view.shape[-1], []).append((i, -1, views.global_view))
            for t, tile in enumerate(views.tiles if views.tiles is not None else ()):
                groups.setdefault(tile.shape[-1], []).append((i, t, tile))
        members = [groups[side] for side in sorted(groups)]
        pixels = [torch.stack([p for _, _, p in group]).to(device, dtype) for group in members]
        trunks = self.sam_model.trunk_groups(pixels, stage)
        sam_tokens = [self.sam_model.tokens(None, stage, trunk) for trunk in trunks]    # [B_g, n_g, 1024]
        n = sum(t.shape[0] * t.shape[1] for t in sam_tokens)
        with stage("CLIP", n, n + len(batch)):
            clip_tokens = self.vision_model.from_token_groups(sam_tokens)
        with stage("projector", n, n):
            feats = [self.projector(torch.cat([c[:, 1:], s], dim=-1)) for c, s in zip(clip_tokens, sam_tokens)]
        global_feats: dict[int, torch.Tensor] = {}
        tile_feats: dict[int, dict[int, torch.Tensor]] = {}
        global_trunks: dict[int, torch.Tensor] = {}
        for group, grid_feats, trunk in zip(members, feats, trunks):
            for (i, t, _), f, tr in zip(group, grid_feats, trunk):
                if t < 0:
                    global_feats[i], global_trunks[i] = f, tr
                else:
                    tile_feats.setdefault(i, {})[t] = f
        out = []
        for i, views in enumerate(batch):
            tiles = torch.stack([tile_feats[i][t] for t in sorted(tile_feats[i])]) if i in tile_feats else None
            tokens = self.layout(global_feats[i], tiles, views.grid)
            if self.saccades is not None:
                tokens = torch.cat([tokens, self._saccade_tokens(global_trunks[i][None], query, stage).to(tokens.dtype)])
            out.append(tokens)
        return out

    def _saccade_tokens(self, trunk: torch.Tensor, query: torch.Tensor | None, stage) -> torch.Tensor:
        side = trunk.shape[1]
        with stage("saccades", side * side, self.saccades.budget(side)):
            extra, _, _ = self.saccades(trunk, query=None if query is None else query.reshape(1, -1))
        return extra

    @torch.no_grad()
    def encode_batch(self, images, modes, max_crops: int = cfg.GUNDAM_MAX_CROPS,
                     query: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Images with a mode each (``modes``: one per image, or one for all), encoded as one packed
        batch (:meth:`encode_views_packed`); same tokens as :meth:`encode` image by image."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        modes = [modes] * len(images) if isinstance(modes, str) else list(modes)
        if len(modes) != len(images):
            raise ValueError(f"modes must be one mode or one per image: got {len(modes)} modes for {len(images)} images")
        return self.encode_views_packed([preprocess(img, m, max_crops) for img, m in zip(images, modes)], query=query)

    @torch.no_grad()
    def encode(self, images, mode: str = "base", max_crops: int = cfg.GUNDAM_MAX_CROPS,
               query: torch.Tensor | None = None) -> list[torch.Tensor]:
        """PIL images or paths (one or a list) -> one ``[n_tokens, 1280]`` tensor per image.

        ``query``: a query embedding for a query-aware :class:`SaccadeSelector` (ignored without one).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [self.encode_views(preprocess(img, mode, max_crops), query=query) for img in images]
