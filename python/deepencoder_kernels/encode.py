"""Encode documents page by page into vision tokens, streamed in packed batches with bounded memory.

Each step is callable on its own, so other drivers (a Ray Data pipeline, a server) can reuse them:

- :func:`list_pages` / :func:`iter_pages`: files, folders and globs -> page references
  (:class:`~deepencoder_kernels.pages.PageRef`), then pages, lazily: a page's pixels are decoded
  (a PDF page rendered, with ``pypdfium2``, the ``pdf`` extra) only when it is preprocessed, at
  the resolution its mode needs;
- :func:`preprocess_page`: one page -> its views (:func:`deepencoder_kernels.preprocess`);
- :func:`encode_views_batch`: the views of a batch of pages -> their tokens, one packed pass
  (``DeepEncoder.encode_views_packed``);
- :func:`encode_pages`: the three chained, ``batch`` pages at a time, yielding ``(page_id, tokens)``;
  a page that fails is reported through ``on_error`` and skipped;
- :class:`TokenWriter`: a safetensors file written as tokens arrive (bytes go to disk at once; only
  the header, written last, stays in memory).

At most ``batch`` pages' views exist at once: pages are read, preprocessed and dropped as their batch
is encoded, so a 2800-page PDF costs what ``batch`` pages cost. Page ids: the file's path for a
single-page image, ``path#page=N`` (1-based) for a page of a PDF or of a multi-page image (the
frames of a TIFF, GIF, WebP or APNG). A page that cannot be read (a locked, empty or cut PDF, a
truncated image, one over the pixel limit) is reported with its id and the cause
(:class:`~deepencoder_kernels.pages.PageError`) and the other pages go on: :func:`encode_files`
writes every good page, lists the failures in ``errors.jsonl`` beside the output (as ``encode
--ray`` does) and returns them; the command line exits 1 when any page failed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from . import config as cfg
from .pages import (ALPHA, IMAGE_SUFFIXES, MAX_PIXELS, PDF_DPI, PDF_MISSING, PageError, PageRef,  # noqa: F401 (API)
                    describe_error, expand_paths, list_pages, pdf_page_count, render_pdf_page)


def read_page(ref: PageRef, render: Callable | None = None):
    """A page as :func:`preprocess_page` takes it: the ref itself, decoded there by
    :func:`~deepencoder_kernels.preprocess.load_image` at the resolution the mode needs; with
    ``render(path, index) -> PIL image`` (another PDF renderer, tests), a PDF page rendered by it."""
    if render is not None and ref.kind == "pdf" and not ref.error:
        return render(ref.path, max(ref.index, 0))
    return ref


def iter_pages(refs: Iterable[PageRef], render: Callable | None = None) -> Iterator[tuple[PageRef, object]]:
    """``(ref, page)`` one at a time, each read only when asked for. A page ``render`` fails on
    comes as ``(ref, the exception)``, so the pages after it still come."""
    for ref in refs:
        try:
            page = read_page(ref, render)
        except Exception as e:
            page = e
        yield ref, page


def preprocess_page(page, mode: str, max_crops: int | None = None, model: str = "v1", **read):
    """One page -> its views for ``mode`` of encoder generation ``model`` ("v1" or "v2"); ``read``:
    :func:`~deepencoder_kernels.preprocess.load_image`'s options (``alpha``, ``max_pixels``, ``password``)."""
    from .preprocess import preprocess

    return preprocess(page, mode, max_crops, model, **read)


def encode_views_batch(encoder, views: list) -> list[torch.Tensor]:
    """The views of several pages -> each page's tokens ``[n, D]``, in one packed pass."""
    with torch.inference_mode():
        return encoder.encode_views_packed(views)


def encode_pages(encoder, pages: Iterable[tuple[object, object]], mode: str, batch: int = 8,
                 max_crops: int | None = None, *, on_error: Callable | None = None, alpha: str = "white",
                 max_pixels: int | None = MAX_PIXELS, password: str | None = None) -> Iterator[tuple[object, torch.Tensor]]:
    """``(id, page)`` pairs (e.g. from :func:`iter_pages`) -> ``(id, tokens)``, ``batch`` pages per
    packed pass. Pulls the next page only while filling a batch and drops each batch's views once
    encoded, so at most ``batch`` pages are held.

    ``on_error(id, exception)``: called for a page that fails (unreadable: a
    :class:`~deepencoder_kernels.pages.PageError`; or failing in the encoder, found by re-encoding
    that batch page by page), which is then skipped; None: the first failure is raised.
    ``alpha``, ``max_pixels``, ``password``: :func:`~deepencoder_kernels.preprocess.load_image`'s.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    model = getattr(encoder, "generation", "v1")   # DeepEncoder: v1, DeepEncoderV2: v2
    cfg.mode_of(mode, model)                         # a clear error naming the model's modes
    if alpha not in ALPHA:
        raise ValueError(f"alpha must be one of {ALPHA}, got {alpha!r}")
    read = dict(alpha=alpha, max_pixels=max_pixels, password=password)
    source = iter(pages)
    while True:
        ids, views = [], []
        for page_id, page in source:
            try:
                if isinstance(page, BaseException):
                    raise page
                views.append(preprocess_page(page, mode, max_crops, model, **read))
            except Exception as e:
                if on_error is None:
                    raise
                on_error(page_id, e)
                continue
            finally:
                del page
            ids.append(page_id)
            if len(views) == batch:
                break
        if not views:
            return
        try:
            tokens = encode_views_batch(encoder, views)
        except Exception:
            if on_error is None:
                raise
            tokens = []
            for page_id, v in zip(ids, views):      # find the page(s) at fault: each alone
                try:
                    tokens.append(encode_views_batch(encoder, [v])[0])
                except Exception as e:
                    on_error(page_id, e)
                    tokens.append(None)
        del views
        yield from ((i, t) for i, t in zip(ids, tokens) if t is not None)
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

    def note(self, text: str) -> None:
        """A line of its own (a failed page), shown even when the bar is off; on a terminal the bar's
        line is cleared first and redrawn at the next update."""
        print(f"\r\x1b[K{text}" if self.enabled and self.tty else text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream)


def encode_files(encoder, paths, out, mode: str = "base", batch: int = 8, max_crops: int | None = None,
                 progress: bool = True, render: Callable | None = None, page_count: Callable | None = None, *,
                 recursive: bool = False, password: str | None = None, alpha: str = "white",
                 max_pixels: int | None = MAX_PIXELS, errors=None, stream=None) -> dict:
    """Images, PDFs, folders and globs (:func:`list_pages`) -> ``out`` (safetensors): one tensor per
    page named by its page id, in page order, the encoder's dtype; metadata ``mode``, ``page_ids``
    (JSON list of the pages written), ``failed_page_ids``, ``dim``, ``max_crops``, ``model`` (v1 or v2).

    A page that cannot be read or encoded is skipped and reported: a line on ``stream`` (default
    stderr, also with ``progress=False``) and a JSON line ``{"page_id", "error"}`` in ``errors``
    (default ``errors.jsonl`` beside ``out``, rewritten by every run: empty when all pages were
    written). Every other page is written. ``recursive``, ``password``, ``alpha``, ``max_pixels``:
    as :func:`list_pages` and :func:`~deepencoder_kernels.preprocess.load_image` take them;
    ``render`` / ``page_count``: replace pdfium's PDF rendering / page count.

    Returns ``{"pages", "encoded", "failed": [(page_id, error), ...], "tokens", "seconds", "out",
    "errors"}``. Raises FileNotFoundError (a path or pattern that names nothing), ValueError (no
    pages at all, bad arguments) and ImportError (PDFs without pypdfium2) before encoding anything.
    """
    refs = list_pages(paths, page_count, recursive=recursive, password=password)
    if not refs:
        raise ValueError("paths: no pages to encode (the folders hold no image or PDF files"
                         f"{'' if recursive else '; --recursive / recursive=True to search their subfolders'})")
    if alpha not in ALPHA:
        raise ValueError(f"alpha must be one of {ALPHA}, got {alpha!r}")
    errors_path = Path(errors) if errors is not None else Path(out).parent / "errors.jsonl"
    writer = TokenWriter(out)
    bar = Progress(len(refs), progress, stream=stream)
    written, failed, tokens_total, start = [], [], 0, time.perf_counter()
    try:
        with open(errors_path, "w") as error_lines:
            def report(page_id, error):
                message = describe_error(error)
                failed.append((page_id, message))
                error_lines.write(json.dumps({"page_id": page_id, "error": message}) + "\n")
                error_lines.flush()
                bar.note(f"page {page_id} failed: {message}")
                bar.update()

            pages = ((ref.page_id, page) for ref, page in iter_pages(refs, render))
            for page_id, tokens in encode_pages(encoder, pages, mode, batch, max_crops, on_error=report, alpha=alpha,
                                                max_pixels=max_pixels, password=password):
                writer.add(page_id, tokens)
                written.append(page_id)
                tokens_total += tokens.shape[0]
                bar.update()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    model = getattr(encoder, "generation", "v1")
    writer.close({"model": model, "mode": mode, "page_ids": json.dumps(written),
                  "failed_page_ids": json.dumps([f for f, _ in failed]), "dim": str(encoder.projector.layers.out_features),
                  "max_crops": str(cfg.mode_of(mode, model).max_crops if max_crops is None else max_crops)})
    seconds = time.perf_counter() - start
    return {"pages": len(refs), "encoded": len(written), "failed": failed, "tokens": tokens_total, "seconds": seconds,
            "out": str(out), "errors": str(errors_path)}


def add_page_arguments(parser) -> None:
    """How pages are found and read: ``encode`` and ``encode --ray`` (and ``python -m deepencoder_kernels.ray``)."""
    g = parser.add_argument_group("pages")
    g.add_argument("--recursive", action="store_true", help="search folders' subfolders too (folders: sorted, hidden files skipped)")
    g.add_argument("--password", help="password of encrypted PDFs (every locked PDF of the run is tried with it; "
                   "visible to other users of this machine in the process list)")
    g.add_argument("--alpha", default="white", choices=list(ALPHA),
                   help="transparent pixels: composited onto white (vLLM's loader), or drop alpha as DeepSeek's infer does")
    g.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"most pixels a page is decoded or rendered at (default {MAX_PIXELS:,}, PIL's bomb limit; 0: none)")


def load_tokens(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file :func:`encode_files` wrote -> ({page id: tokens} in page order, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        ids = json.loads(meta.get("page_ids", "[]")) or list(f.keys())
        return {i: f.get_tensor(i) for i in ids}, meta
