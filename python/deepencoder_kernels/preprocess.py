"""Image -> views, pixel for pixel as DeepSeek's processors prepare them, for both encoder generations.

Every input, for both generations, goes through :func:`load_image` (paths, page ids, PDF pages,
PIL images -> RGB): paths get their EXIF orientation applied (both upstream loaders do); PIL images
are taken as given, as upstream's processors take them (an image from a bare ``Image.open`` keeps
its EXIF orientation tag unapplied: pass the path, or transpose it yourself).

DeepSeek-OCR (v1: the Hugging Face ``infer`` path and vLLM's ``DeepseekOCRProcessor``), Tiny/Small/Base/Large/Gundam:
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

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import config as cfg
from .pages import MAX_PIXELS, read_page_image


@dataclass
class Views:
    global_view: torch.Tensor            # [3, S, S]
    tiles: torch.Tensor | None           # [n_w * n_h, 3, 640, 640], row-major, or None
    grid: tuple[int, int] = (1, 1)       # (n_w, n_h)


def load_image(image, *, view_sizes=None, alpha: str = "white", max_pixels: int | None = MAX_PIXELS,
               password: str | None = None) -> Image.Image:
    """Any page -> an RGB PIL image: the one loader every path uses (``preprocess``, ``encode``,
    ``encode --ray``, the encoders' ``encode``).

    ``image``: a PIL image (taken as given: no EXIF transpose, no reduction, only made RGB); a path
    (EXIF orientation applied; a PDF or multi-page image gives its page 1, with a warning naming
    how to get the others); a page id ``path#page=N`` (page N of a PDF or multi-page image, 1-based,
    as :mod:`deepencoder_kernels.encode` names pages); or a :class:`~deepencoder_kernels.pages.PageRef`.

    Pixel formats (:func:`deepencoder_kernels.pages.to_rgb`): alpha composited onto white, as vLLM's
    loader does (``alpha="drop"``: DeepSeek's own ``infer``, ``convert("RGB")``, which turns a
    transparent page black); 16 and 32-bit integer and float samples scaled from their type's range
    to 8 bits (not clipped: a 16-bit scan keeps dark text on a light page); every other mode as
    PIL's ``convert("RGB")``. PDF pages are rendered by pdfium at 144 dpi on white.

    ``view_sizes(width, height) -> [(w, h), ...]``: the size each view resizes the page to
    (:func:`view_sizes`); given, a page more than ``2 * pages.REDUCING_GAP`` (6) times larger than
    every view on both axes is decoded at 1/k per side (JPEG DCT scaling at 1/2, 1/4, 1/8, else PIL
    ``reduce`` after decoding) leaving every view at least 3 times smaller, a PDF page rendered
    below 144 dpi leaving every view 4 times smaller, and only when the views keep their geometry
    (Gundam grid, letterbox size). None: full resolution.

    What exactness means here: upstream resizes the full-resolution page with PIL (bicubic,
    antialiased: every output pixel a function of every source pixel under it), so any reduction
    before it changes some output pixels. The pages people scan and photograph are never reduced
    (an A4 page at 300 dpi, a 12 MP photo, a PDF page up to A2 at 144 dpi: all under 6x
    every view of every mode), and their views are upstream's, bit for bit (tested). Beyond that,
    decoding every pixel costs time and memory growing with the page (a 14000 x 13000 scan: 5-9 s
    and ~1.05 GiB, upstream's way; 0.4-2.3 s and 30-353 MiB here, Tiny to Gundam) for no visible
    gain: measured by ``benchmarks/bench_pages.py``, the reduced views of that scan differ from
    upstream's by at most 7 levels of 255 at a few sharp edges (mean under 0.25); PIL calls a 3x
    gap "indistinguishable from fair resampling in most cases" (``reducing_gap``). A PDF page
    rendered lower is rasterised anew (pdfium snaps glyphs to its grid), so glyph edges move more:
    up to ~70 levels at some edges, mean under 0.35, on a 100-inch page of text (8-12 s and 1.6 GiB
    at 144 dpi; 0.16-3.1 s and 41-436 MiB here).

    ``max_pixels``: the most pixels a page may be decoded or rendered at (after any reduction;
    default PIL's own bomb limit, 178,956,970; 0 or None: no limit); over it, a PageError names
    the file and the option. ``password``: for encrypted PDFs.

    Raises :class:`~deepencoder_kernels.pages.PageError` (naming the file, the page and the cause),
    FileNotFoundError (no such path), TypeError (not an image), ValueError (bad ``alpha``/``max_pixels``).
    """
    return read_page_image(image, view_sizes=view_sizes, alpha=alpha, max_pixels=max_pixels, password=password)


def _contain_size(width: int, height: int, side: int) -> tuple[int, int]:
    # ImageOps.contain's arithmetic (what ImageOps.pad resizes to before padding)
    if width == height:
        return side, side
    if width > height:
        return side, round(height / width * side)
    return round(width / height * side), side


def view_sizes(mode: str, width: int, height: int, max_crops: int | None = None, model: str = "v1") -> list[tuple[int, int]]:
    """The size each of :func:`preprocess`'s views resizes a ``width`` x ``height`` page to: the
    global view (``(r, r)`` for a mode that resizes first: v1 Tiny/Small, v2 base; the letterboxed
    size otherwise), then the tile mosaic (T n_w, T n_h). What :func:`load_image` needs to decode a
    huge page no larger than that. (A view resized from another view, v2 base's 768 -> 1024, is
    not a resize of the page.)"""
    m = cfg.mode_of(mode, model)
    sizes = [(m.resize_first, m.resize_first) if m.resize_first else _contain_size(width, height, m.base_size)]
    if m.tiles and (width > m.tile_size or height > m.tile_size):
        n_w, n_h = choose_tile_grid(width, height, m.tile_size, m.min_crops, m.max_crops if max_crops is None else max_crops)
        sizes.append((m.tile_size * n_w, m.tile_size * n_h))
    return sizes


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


def preprocess(image, mode: str = "base", max_crops: int | None = None, model: str = "v1", *, alpha: str = "white",
               max_pixels: int | None = MAX_PIXELS, password: str | None = None) -> Views:
    """One page -> its views for ``mode`` of encoder generation ``model`` ("v1" or "v2").
    ``max_crops``: the tile budget (None: the mode's, 9 for v1 Gundam, 6 for v2 dynamic). The page:
    anything :func:`load_image` takes (``alpha``, ``max_pixels``, ``password``: its options); pages
    far larger than every view are decoded reduced (see :func:`load_image`)."""
    m = cfg.mode_of(mode, model)
    image = load_image(image, view_sizes=lambda w, h: view_sizes(mode, w, h, max_crops, model), alpha=alpha,
                       max_pixels=max_pixels, password=password)
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
