"""The two encoder generations, sharing one SAM trunk + compressor, preprocessing and page batching:

- :class:`DeepEncoder` (DeepSeek-OCR): SAM trunk -> compressor -> CLIP -> concat -> projector -> newline layout;
- :class:`DeepEncoderV2` (DeepSeek-OCR 2): SAM trunk -> compressor (net_3 to 896) -> causal flow (a Qwen2
  decoder as encoder over [image tokens; learned queries]) -> projector -> [tiles][global][separator].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import config as cfg
from ..pages import MAX_PIXELS
from ..preprocess import Views, preprocess
from ..stages import nvtx_stage
from .causal_flow import CausalFlowEncoder
from .clip import ClipVisionModel
from .saccade import SaccadeSelector
from .sam import SamEncoder, check_pixels


class MlpProjector(nn.Module):
    """``projector.layers``: one Linear (2048 -> 1280 in v1, 896 -> 1280 in V2)."""

    def __init__(self, in_dim: int = cfg.PROJ_IN, out_dim: int = cfg.PROJ_OUT):
        super().__init__()
        self.layers = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.layers(x)


def views_by_size(batch: list[Views]) -> list[list[tuple[int, int, torch.Tensor]]]:
    """Every view of every page, grouped by side (ascending): ``(page, tile index or -1 for the
    global view, pixels [3, S, S])`` each, so same-size views batch through the trunk together."""
    groups: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for i, views in enumerate(batch):
        groups.setdefault(views.global_view.shape[-1], []).append((i, -1, views.global_view))
        for t, tile in enumerate(views.tiles if views.tiles is not None else ()):
            groups.setdefault(tile.shape[-1], []).append((i, t, tile))
    return [groups[side] for side in sorted(groups)]


def split_by_page(members, feats, count: int):
    """Per-group features back per page: ``(global [n, D] per page, {page: [tiles [n_t, D] in order]})``."""
    global_feats: dict[int, torch.Tensor] = {}
    tile_feats: dict[int, dict[int, torch.Tensor]] = {}
    for group, grid_feats in zip(members, feats):
        for (i, t, _), f in zip(group, grid_feats):
            if t < 0:
                global_feats[i] = f
            else:
                tile_feats.setdefault(i, {})[t] = f
    tiles = {i: torch.stack([by_index[t] for t in sorted(by_index)]) for i, by_index in tile_feats.items()}
    return [global_feats[i] for i in range(count)], [tiles.get(i) for i in range(count)]


class _PageEncoder(nn.Module):
    """What both generations share: checkpoint loading, preprocessing by mode, page batching.
    Subclasses provide ``encode_views(views, stage, **kw)`` and ``encode_views_packed(batch, stage, **kw)``."""

    generation = "v1"   # which preprocessing modes (``config.MODELS``) and checkpoint names apply

    def load_checkpoint(self, path, strict: bool = True):
        """Copy a checkpoint's vision weights in (see :func:`deepencoder_kernels.checkpoint.load_checkpoint`)."""
        from ..checkpoint import load_checkpoint

        return load_checkpoint(self, path, strict=strict)

    def preprocess(self, image, mode: str, max_crops: int | None = None, **read) -> Views:
        """One image (path or PIL) -> its views for this generation's ``mode``; ``read``:
        :func:`~deepencoder_kernels.preprocess.load_image`'s options (``alpha``, ``max_pixels``, ``password``)."""
        return preprocess(image, mode, max_crops, self.generation, **read)

    @property
    def _placement(self):
        weight = self.projector.layers.weight
        return weight.device, weight.dtype

    def _views_of(self, images, modes, max_crops, on_error, read) -> tuple[list[int], list[Views]]:
        """Each image's views; an image that cannot be read goes to ``on_error(index, error)`` (the error
        names the file, page and cause) and is left out, or, without ``on_error``, is raised."""
        done, views = [], []
        for i, (image, mode) in enumerate(zip(images, modes)):
            try:
                views.append(self.preprocess(image, mode, max_crops, **read))
            except Exception as e:
                if on_error is None:
                    raise
                on_error(i, e)
                continue
            done.append(i)
        return done, views

    @torch.no_grad()
    def encode_batch(self, images, modes, max_crops: int | None = None, *, on_error=None, alpha: str = "white",
                     max_pixels: int | None = MAX_PIXELS, password: str | None = None, **kwargs) -> list[torch.Tensor | None]:
        """Images with a mode each (``modes``: one per image, or one for all), encoded as one packed
        batch (``encode_views_packed``); same tokens as :meth:`encode` image by image.

        ``on_error(index, error)``: called for each image that cannot be read (a
        :class:`~deepencoder_kernels.pages.PageError` naming the file, page and cause), whose slot is
        then None while every other image is encoded; None: the first such error is raised.
        ``alpha``, ``max_pixels``, ``password``: :func:`~deepencoder_kernels.preprocess.load_image`'s."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        modes = [modes] * len(images) if isinstance(modes, str) else list(modes)
        if len(modes) != len(images):
            raise ValueError(f"modes must be one mode or one per image: got {len(modes)} modes for {len(images)} images")
        read = dict(alpha=alpha, max_pixels=max_pixels, password=password)
        done, views = self._views_of(images, modes, max_crops, on_error, read)
        out: list[torch.Tensor | None] = [None] * len(images)
        for i, tokens in zip(done, self.encode_views_packed(views, **kwargs) if views else ()):
            out[i] = tokens
        return out

    @torch.no_grad()
    def encode(self, images, mode: str = "base", max_crops: int | None = None, *, on_error=None, alpha: str = "white",
               max_pixels: int | None = MAX_PIXELS, password: str | None = None, **kwargs) -> list[torch.Tensor | None]:
        """PIL images or paths (one or a list) -> one ``[n_tokens, 1280]`` tensor per image, one image at a
        time; ``on_error`` and the reading options as in :meth:`encode_batch`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        read = dict(alpha=alpha, max_pixels=max_pixels, password=password)
        out = []
        for i, image in enumerate(images):     # read each image only when it is encoded
            report = None if on_error is None else (lambda _, e, i=i: on_error(i, e))
            _, views = self._views_of([image], [mode], max_crops, report, read)
            out.append(self.encode_views(views[0], **kwargs) if views else None)
        return out


class DeepEncoder(_PageEncoder):
    """The vision side of DeepSeek-OCR, with the checkpoint's names (no ``model.`` prefix).

    ``sam_model(pixels) -> [B, 1024, h, w]``, ``vision_model(pixels, sam_features)``,
    ``projector(x)``, ``image_newline`` and ``view_seperator`` (sic) as upstream has them.

    ``saccades``: an optional :class:`SaccadeSelector`; with one, each image's tokens are followed by
    the saccade tokens of its global view (not part of the DeepSeek-OCR checkpoint). ``encode`` /
    ``encode_batch`` then take ``query=``: a query embedding for a query-aware selector.
    """

    generation = "v1"

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
        device, dtype = self._placement
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
        device, dtype = self._placement
        members = views_by_size(batch)
        pixels = [torch.stack([p for _, _, p in group]).to(device, dtype) for group in members]
        trunks = self.sam_model.trunk_groups(pixels, stage)
        sam_tokens = [self.sam_model.tokens(None, stage, trunk) for trunk in trunks]    # [B_g, n_g, 1024]
        n = sum(t.shape[0] * t.shape[1] for t in sam_tokens)
        with stage("CLIP", n, n + len(batch)):
            clip_tokens = self.vision_model.from_token_groups(sam_tokens)
        with stage("projector", n, n):
            feats = [self.projector(torch.cat([c[:, 1:], s], dim=-1)) for c, s in zip(clip_tokens, sam_tokens)]
        global_feats, tile_feats = split_by_page(members, feats, len(batch))
        out = [self.layout(global_feats[i], tile_feats[i], views.grid) for i, views in enumerate(batch)]
        if self.saccades is None:
            return out
        global_trunks = {i: tr for group, trunk in zip(members, trunks) for (i, t, _), tr in zip(group, trunk) if t < 0}
        return [torch.cat([tokens, self._saccade_tokens(global_trunks[i][None], query, stage).to(tokens.dtype)])
                for i, tokens in enumerate(out)]

    def _saccade_tokens(self, trunk: torch.Tensor, query: torch.Tensor | None, stage) -> torch.Tensor:
        side = trunk.shape[1]
        with stage("saccades", side * side, self.saccades.budget(side)):
            extra, _, _ = self.saccades(trunk, query=None if query is None else query.reshape(1, -1))
        return extra


class DeepEncoderV2(_PageEncoder):
    """The vision side of DeepSeek-OCR 2 (DeepEncoder V2), with the checkpoint's names (no ``model.``
    prefix; 473 tensors): ``sam_model.*`` (v1's trunk and compressor, net_3 to 896), ``qwen2_model.*``
    (:class:`CausalFlowEncoder`), ``projector.layers`` (896 -> 1280) and ``view_seperator`` (sic).

    Views are 768 px tiles (144 tokens) and a 1024 px global view (256 tokens). A page's tokens:
    ``[tile 0's 144, ..., tile k-1's 144, the global view's 256, view_seperator]`` = 257 + 144 k
    (DeepSeek-OCR 2's ``deepseek_ocr2.py``; no newline tokens). Modes: ``dynamic`` (DeepSeek-OCR 2's
    crop mode: tiles when a side exceeds 768) and ``base`` (crop mode off: one view).
    """

    generation = "v2"

    def __init__(self, sam: SamEncoder | None = None, causal_flow: CausalFlowEncoder | None = None,
                 projector: MlpProjector | None = None):
        super().__init__()
        self.sam_model = sam or SamEncoder(out_dim=cfg.CAUSAL_FLOW_DIM, net2_dim=cfg.SAM_NET2_DIM)
        self.qwen2_model = causal_flow or CausalFlowEncoder()
        self.projector = projector or MlpProjector(cfg.V2_PROJ_IN, cfg.PROJ_OUT)
        self.view_seperator = nn.Parameter(torch.zeros(self.projector.layers.out_features))

    def view_features(self, pixel_groups: list[torch.Tensor], stage=nvtx_stage) -> list[torch.Tensor]:
        """Views of each size (``pixel_groups[g]``: ``[B_g, 3, S_g, S_g]``, S_g 768 or 1024) -> their
        projected query outputs ``[B_g, n_g, 1280]``: the trunk and compress per size (V2 has two sizes,
        each a batch at the fixed-grid kernels), then one packed causal-flow pass over every view and the
        projector."""
        for i, pixels in enumerate(pixel_groups):
            cfg.check_v2_view_size(check_pixels(pixels, f"pixel_groups[{i}]"), f"pixel_groups[{i}]'s side")
        tokens = [self.sam_model.tokens(pixels, stage) for pixels in pixel_groups]    # [B_g, n_g, 896]
        n = sum(t.shape[0] * t.shape[1] for t in tokens)
        with stage("causal flow", n, n):
            flows = self.qwen2_model.from_token_groups(tokens)
        with stage("projector", n, n):
            return [self.projector(f) for f in flows]

    def layout(self, global_feats: torch.Tensor, tile_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream's token order: every tile's tokens (row-major tiles), the global view's, the separator."""
        parts = [] if tile_feats is None else [tile_feats.reshape(-1, tile_feats.shape[-1])]
        parts += [global_feats, self.view_seperator.to(global_feats.dtype)[None]]
        return torch.cat(parts)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed views ``[B, 3, S, S]`` in [-1, 1], S = 768 or 1024 -> ``[B, (S/64)^2, 1280]``:
        each view's query outputs (projected) in their causal order; no separator."""
        cfg.check_v2_view_size(check_pixels(pixels), "pixels' side")
        return self.view_features([pixels])[0]

    def encode_views_packed(self, batch: list[Views], stage=nvtx_stage) -> list[torch.Tensor]:
        """Every view of every page (768 tiles and 1024 global views) in one packed pass; returns each
        page's tokens as :meth:`encode_views` gives them."""
        device, dtype = self._placement
        members = views_by_size(batch)
        pixels = [torch.stack([p for _, _, p in group]).to(device, dtype) for group in members]
        global_feats, tile_feats = split_by_page(members, self.view_features(pixels, stage), len(batch))
        return [self.layout(g, t) for g, t in zip(global_feats, tile_feats)]

    def encode_views(self, views: Views, stage=nvtx_stage) -> torch.Tensor:
        """One page's views -> its ``[257 + 144 k, 1280]`` tokens."""
        return self.encode_views_packed([views], stage)[0]
