"""Image -> views, pixel for pixel as DeepSeek's processors prepare them, for both encoder generations.

DeepSeek-OCR (v1: the Hugging Face ``infer`` path and vLLM's ``DeepseekOCRProcessor``), Tiny/Small/Base/Large/Gundam:
- Paths are opened with ``ImageOps.exif_transpose`` first (both upstream loaders do), then made
  RGB. PIL images are taken as given, as upstream's processors take them: an image from a bare
  ``Image.open`` keeps its EXIF orientation tag unapplied (pass the path, or transpose it yourself).
- Tiny/Small: ``image.resize((S, S))`` with PIL's default filter (bicubic), then ``ImageOps.pad``
  to (S, S) with gray, exactly upstream's two calls (the pad leaves an (S, S) image as it is).
- Base/Large: letterboxed into the square with gray (127, 127, 127), aspect kept (``ImageOps.pad``).
- Gundam: a 1024 letterboxed global view, plus 640 px tiles when a side exceeds 640: the
  (n_w, n_h) grid with min_crops <= n_w * n_h <= max_crops whose aspect ratio is closest to the
  image's (ties go to the later, larger grid when the image area exceeds half the grid's area),
  the image resized (default filter) to (640 n_w, 640 n_h) and cut row-major. The crop budget
  differs between the upstreams: ``max_crops`` 9 in the HF code (the default here), 6 in the
  vLLM config (``MAX_CROPS``); pass ``max_crops=6`` to match a vLLM deployment.

DeepSeek-OCR 2 (``model="v2"``; ``DeepSeek-OCR2-vllm/process/image_process.py``):
- ``dynamic`` (its crop mode): a 1024 letterboxed global view, plus 768 px tiles when a side exceeds
  768, by the same grid rule with 2 <= tiles <= 6, resized with PIL's default filter, cut row-major,
  no padding on tiles.
- ``base`` (crop mode off): the image is first ``resize((768, 768))`` and that square then padded,
  i.e. upscaled, into the 1024 view (upstream's order of calls, kept).
Pixels are normalised to [-1, 1] (mean 0.5, std 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import config as cfg


@dataclass
class Views:
    global_view: torch.Tensor            # [3, S, S]
    tiles: torch.Tensor | None           # [n_w * n_h, 3, 640, 640], row-major, or None
    grid: tuple[int, int] = (1, 1)       # (n_w, n_h)


def load_image(image) -> Image.Image:
    """A path (opened, EXIF orientation applied) or a PIL image (as given) -> RGB."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a path, got {type(image).__name__}")
    return image.convert("RGB")


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def choose_tile_grid(width: int, height: int, tile: int = 640, min_crops: int = cfg.GUNDAM_MIN_CROPS,
                     max_crops: int = cfg.GUNDAM_MAX_CROPS) -> tuple[int, int]:
    """The (n_w, n_h) tile grid for an image of width x height (upstream's rule)."""
    grids = sorted(
        {(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if min_crops <= i * j <= max_crops},
        key=lambda g: g[0] * g[1],
    )
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * g[0] * g[1]:
            best = g
    return best


def preprocess(image, mode: str = "base", max_crops: int | None = None, model: str = "v1") -> Views:
    """One image -> its views for ``mode`` of encoder generation ``model`` ("v1" or "v2").
    ``max_crops``: the tile budget (None: the mode's, 9 for v1 Gundam, 6 for v2 dynamic)."""
    m = cfg.mode_of(mode, model)
    image = load_image(image)
    S = m.base_size
    # upstream resizes with no filter argument (PIL's default), then pads either way
    source = image.resize((m.resize_first, m.resize_first)) if m.resize_first else image
    global_image = ImageOps.pad(source, (S, S), color=cfg.PAD_GRAY)
    views = Views(to_pixels(global_image), None)
    w, h = image.size
    if m.tiles and (w > m.tile_size or h > m.tile_size):
        n_w, n_h = choose_tile_grid(w, h, m.tile_size, m.min_crops, m.max_crops if max_crops is None else max_crops)
        T = m.tile_size
        resized = image.resize((T * n_w, T * n_h))
        tiles = [resized.crop((c * T, r * T, (c + 1) * T, (r + 1) * T)) for r in range(n_h) for c in range(n_w)]
        views.tiles = torch.stack([to_pixels(t) for t in tiles])
        views.grid = (n_w, n_h)
    return views


def token_count(mode: str, grid: tuple[int, int] = (1, 1), model: str = "v1") -> int:
    """Tokens one image produces. v1: h*(w+1) + 1 natively; tiles add 10 n_h (10 n_w + 1).
    v2: 256 global + 1 separator; tiles add 144 each (257 + 144 k)."""
    m = cfg.mode_of(mode, model)
    n_w, n_h = grid
    tiled = m.tiles and n_w * n_h > 1
    if model == "v2":
        return cfg.v2_view_tokens(m.base_size) + 1 + (n_w * n_h * cfg.v2_view_tokens(m.tile_size) if tiled else 0)
    n = cfg.view_tokens(m.base_size) + 1
    if tiled:
        g = cfg.compressed_grid(m.tile_size)
        n += g * n_h * (g * n_w + 1)
    return n


def render_document_page(width: int = 1240, height: int = 1754, seed: int = 0) -> Image.Image:
    """A synthetic A4 page at 150 dpi (title, paragraphs, a table), so the profiler needs no download."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default()
    words = "the encoder compresses vision tokens optical context attention window global neck".split()
    y = 80
    draw.text((100, y), "DeepEncoder profile page", fill="black", font=font)
    y += 60
    while y < height * 0.6:
        line = " ".join(rng.choice(words, size=14))
        draw.text((100, y), line, fill="black", font=font)
        y += 22
    for r in range(8):
        for c in range(5):
            x0, y0 = 100 + c * 200, int(height * 0.65) + r * 40
            draw.rectangle((x0, y0, x0 + 200, y0 + 40), outline="black")
            draw.text((x0 + 10, y0 + 12), f"{rng.integers(0, 1000)}", fill="black", font=font)
    return page
