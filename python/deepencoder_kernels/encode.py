"""Encode documents page by page into vision tokens, streamed in packed batches with bounded memory.

Each step is callable on its own, so other drivers (a Ray Data pipeline, a server) can reuse them:

- :func:`list_pages` / :func:`iter_pages`: files -> page references, then pages (a PIL image or an
  image path), lazily: a PDF page is rendered only when it is reached (``pypdfium2``, the ``pdf``
  extra);
- :func:`preprocess_page`: one page -> its views (:func:`deepencoder_kernels.preprocess`);
- :func:`encode_views_batch`: the views of a batch of pages -> their tokens, one packed pass
  (``DeepEncoder.encode_views_packed``);
- :func:`encode_pages`: the three chained, ``batch`` pages at a time, yielding ``(page_id, tokens)``;
- :class:`TokenWriter`: a safetensors file written as tokens arrive (bytes go to disk at once; only
  the header, written last, stays in memory).

At most ``batch`` pages' views exist at once: pages are read, preprocessed and dropped as their batch
is encoded, so a 2800-page PDF costs what ``batch`` pages cost. Page ids: the file's path for an
image, ``path#page=N`` (1-based) for a PDF page.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import config as cfg

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
PDF_DPI = 144          # PDF pages are rendered at 144 dpi (an A4 page: 1191 x 1684 px)
PDF_MISSING = ("reading PDF pages needs pypdfium2, which is not installed: "
               "pip install 'deepencoder-kernels[pdf]' (or pip install pypdfium2)")


@dataclass(frozen=True)
class PageRef:
    """Where a page comes from: an image file (``index`` -1) or page ``index`` (0-based) of a PDF."""
    path: str
    index: int = -1

    @property
    def page_id(self) -> str:
        return self.path if self.index < 0 else f"{self.path}#page={self.index + 1}"


def _pdfium():
    try:
        import pypdfium2
    except ImportError as e:
        raise ImportError(PDF_MISSING) from e
    return pypdfium2


def pdf_page_count(path) -> int:
    doc = _pdfium().PdfDocument(str(path))
    try:
        return len(doc)
    finally:
        doc.close()


def render_pdf_page(path, index: int, dpi: int = PDF_DPI):
    """Page ``index`` (0-based) of a PDF as an RGB PIL image."""
    doc = _pdfium().PdfDocument(str(path))
    try:
        page = doc[index]
        try:
            return page.render(scale=dpi / 72).to_pil().convert("RGB")
        finally:
            page.close()
    finally:
        doc.close()


def list_pages(paths: Iterable, page_count=pdf_page_count) -> list[PageRef]:
    """Files (images, PDFs) -> one :class:`PageRef` per page, in order. Reads no pixels: a PDF is
    opened for its page count only. ``page_count(path)`` is replaceable (tests, other renderers)."""
    refs = []
    for p in ([paths] if isinstance(paths, (str, Path)) else paths):
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"paths: no such file: {path}")
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            refs += [PageRef(str(path), k) for k in range(page_count(path))]
        elif suffix in IMAGE_SUFFIXES:
            refs.append(PageRef(str(path)))
        else:
            raise ValueError(f"paths: {path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a .pdf")
    return refs


def read_page(ref: PageRef, render=render_pdf_page):
    """A page's pixels as :func:`preprocess` takes them: an image file's path (opened there, EXIF
    orientation applied) or a rendered PDF page."""
    return ref.path if ref.index < 0 else render(ref.path, ref.index)


def iter_pages(refs: Iterable[PageRef], render=render_pdf_page) -> Iterator[tuple[PageRef, object]]:
    """``(ref, page)`` one at a time, each read only when asked for."""
    for ref in refs:
        yield ref, read_page(ref, render)


def preprocess_page(page, mode: str, max_crops: int = cfg.GUNDAM_MAX_CROPS):
    from .preprocess import preprocess

    return preprocess(page, mode, max_crops)


def encode_views_batch(encoder, views: list) -> list[torch.Tensor]:
    """The views of several pages -> each page's tokens ``[n, D]``, in one packed pass."""
    with torch.inference_mode():
        return encoder.encode_views_packed(views)


def encode_pages(encoder, pages: Iterable[tuple[object, object]], mode: str, batch: int = 8,
                 max_crops: int = cfg.GUNDAM_MAX_CROPS) -> Iterator[tuple[object, torch.Tensor]]:
    """``(id, page)`` pairs (e.g. from :func:`iter_pages`) -> ``(id, tokens)``, ``batch`` pages per
    packed pass. Pulls the next page only while filling a batch and drops each batch's views once
    encoded, so at most ``batch`` pages are held."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if mode not in cfg.MODES:
        raise ValueError(f"mode must be one of {sorted(cfg.MODES)}, got {mode!r}")
    source = iter(pages)
    while True:
        ids, views = [], []
        for page_id, page in source:
            ids.append(page_id)
            views.append(preprocess_page(page, mode, max_crops))
            del page
            if len(views) == batch:
                break
        if not views:
            return
        tokens = encode_views_batch(encoder, views)
        del views
        yield from zip(ids, tokens)
        del tokens


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class TokenWriter:
    """A safetensors file written incrementally: each tensor's bytes are appended to a temporary
    file next to ``path`` as it arrives; :meth:`close` writes the header (names, shapes, offsets,
    ``metadata``) and then copies the bytes after it, in chunks. Memory: the header only."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.", delete=False)
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"name {name!r} was already written")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor must be float32, float16 or bfloat16, got {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._data.write(raw)
        self._header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)          # the data starts 8-byte aligned, as safetensors writes it
        self._data.close()
        tmp_out = self.path.with_name(f".{self.path.name}.part")
        try:
            with open(tmp_out, "wb") as out, open(self._data.name, "rb") as data:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                shutil.copyfileobj(data, out, 16 << 20)
            os.replace(tmp_out, self.path)
        finally:
            os.unlink(self._data.name)
        return self.path

    def abort(self) -> None:
        self._data.close()
        os.unlink(self._data.name)


class Progress:
    """A progress bar on stderr: one updating line on a terminal, a line every ``every`` s elsewhere."""

    def __init__(self, total: int, enabled: bool = True, every: float = 10.0, stream=None):
        self.total, self.enabled, self.every = total, enabled, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        filled = int(30 * self.done / max(self.total, 1))
        text = (f"[encode] |{'#' * filled}{'.' * (30 - filled)}| {self.done}/{self.total} pages, "
                f"{rate:.2f} pages/s, {now - self.start:.0f}s")
        print(f"\r{text}" if self.tty else text, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream)


def encode_files(encoder, paths, out, mode: str = "base", batch: int = 8, max_crops: int = cfg.GUNDAM_MAX_CROPS,
                 progress: bool = True, render=render_pdf_page, page_count=pdf_page_count) -> dict:
    """Images and PDFs -> ``out`` (safetensors): one tensor per page named by its page id, in page
    order, the encoder's dtype; metadata ``mode``, ``page_ids`` (JSON list), ``dim``. Returns a summary."""
    refs = list_pages(paths, page_count)
    if not refs:
        raise ValueError("paths: no pages to encode")
    writer = TokenWriter(out)
    bar = Progress(len(refs), progress)
    tokens_total, start = 0, time.perf_counter()
    try:
        pages = ((ref.page_id, page) for ref, page in iter_pages(refs, render))
        for page_id, tokens in encode_pages(encoder, pages, mode, batch, max_crops):
            writer.add(page_id, tokens)
            tokens_total += tokens.shape[0]
            bar.update()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    ids = [r.page_id for r in refs]
    writer.close({"mode": mode, "page_ids": json.dumps(ids), "dim": str(encoder.projector.layers.out_features),
                  "max_crops": str(max_crops)})
    seconds = time.perf_counter() - start
    return {"pages": len(refs), "tokens": tokens_total, "seconds": seconds, "out": str(out)}


def load_tokens(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file :func:`encode_files` wrote -> ({page id: tokens} in page order, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        ids = json.loads(meta.get("page_ids", "[]")) or list(f.keys())
        return {i: f.get_tensor(i) for i in ids}, meta
