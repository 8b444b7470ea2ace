"""Encode a collection of pages with Ray Data: on a laptop (local Ray, CPU) or on every GPU of a cluster.

``pip install "deepencoder-kernels[ray]"``. The same code runs on both; only the resources differ::

    from deepencoder_kernels.ray import encode_collection
    summary = encode_collection("scans/", "tokens/", mode="gundam", weights="DeepSeek-OCR/")
    # or: deepencoder-kernels encode scans/ --out tokens/ --mode gundam --weights DeepSeek-OCR/ --ray

It is built from :mod:`deepencoder_kernels.encode`'s steps (page listing and ids, PDF rendering,
preprocessing, the packed batch encode, the safetensors writer), so ``encode --ray`` gives each
page the tokens and the page id that ``encode`` gives it. The pipeline (streaming: pages flow
through it, the collection is never held at once):

1. the driver lists the pages with ``encode``'s listing (:func:`deepencoder_kernels.pages.list_pages`:
   folders sorted, their subfolders with ``recursive``, globs, a file named twice read once; image
   files, their frames for multi-page TIFF/GIF/WebP/APNG, PDF pages when ``pypdfium2`` is
   installed), each with ``encode``'s ``page_id`` (its path, ``path#page=N`` for a page of a PDF
   or multi-page image) and a mode; a file that cannot be listed (a locked PDF) is one failed page;
2. CPU tasks read and preprocess them exactly as ``encode`` does and pass the views on as uint8
   (4x smaller than the float pixels; rebuilt bit for bit);
3. an actor pool (``map_batches`` with ``concurrency`` actors, one model per actor, ``num_gpus``
   each, or CPU actors locally) encodes each batch with the packed mixed-mode encoder
   (``encode_views_packed``: any mix of modes, Gundam tiles included, one packed pass); a batch
   that fails is re-run page by page so one bad page fails alone;
4. the driver writes the tokens as they arrive, in shards of ``shard_pages`` pages:
   ``tokens-00000.safetensors`` (one tensor per page, named by its page id; metadata: page ids and
   modes) or ``tokens-00000.parquet`` (columns page_id, mode, n_tokens, dim, dtype, tokens as raw
   bytes), plus ``errors.jsonl`` (page id and error of every failed page) and ``summary.json``.

Memory stays bounded: Ray Data's streaming executor back-pressures the stages (object store
budget: ``object_store_limit``); the driver writes safetensors bytes as they arrive (it keeps the
shard's header) and holds at most one parquet shard. A page that fails (unreadable file,
bad mode, an error in the encoder) is reported with its id; the rest go on. Encoder actors are
restarted and their in-flight batch retried when a worker dies (Ray Data's actor-pool defaults,
``max_restarts=-1``, ``max_task_retries=-1``); the driver counts any page id that would arrive
twice and writes it once.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import config as cfg
from . import encode as pages_io
from .encode import IMAGE_SUFFIXES, MAX_PIXELS, PDF_DPI, PageRef, describe_error  # noqa: F401 (API)


# ---- pages ------------------------------------------------------------------------------------

_REF_FIELDS = ("path", "index", "kind", "frame", "error")


def list_pages(source, recursive: bool = False, password: str | None = None) -> list[dict]:
    """Folders, globs, image files and PDFs (one or a list) -> page items ``{"page_id", "path",
    "index", "kind", "frame", "error"}`` (a :class:`PageRef`'s fields): ``encode``'s listing and
    page ids, the same function. Raises FileNotFoundError naming ``source`` for a path that names nothing."""
    return [{"page_id": r.page_id, **{k: getattr(r, k) for k in _REF_FIELDS}}
            for r in pages_io.list_pages(source, recursive=recursive, password=password, name="source")]


def read_page(path: str, index: int, kind: str = "", frame: int = -1, error: str = ""):
    """``encode``'s page reader for an item's fields: the page's ref, decoded by ``preprocess_page``
    at the resolution its mode needs."""
    return pages_io.read_page(PageRef(str(path), int(index), str(kind), int(frame), str(error)))


def _to_u8(pixels: torch.Tensor) -> np.ndarray:
    # preprocess makes pixels as (u / 255 - 0.5) / 0.5 from uint8 u: this inverts it exactly
    return ((pixels * 0.5 + 0.5) * 255).round_().to(torch.uint8).numpy()


def _from_u8(u8: np.ndarray) -> torch.Tensor:
    # the very arithmetic of preprocess.to_pixels, so the views are bit-identical
    x = torch.from_numpy(np.ascontiguousarray(u8).astype(np.float32) / 255.0)
    return (x - 0.5) / 0.5


def preprocess_batch(batch: dict, max_crops: int | None = None, model: str = "v1", alpha: str = "white",
                     max_pixels: int | None = MAX_PIXELS, password: str | None = None) -> dict:
    """CPU stage: page items -> uint8 views (global [3, S, S], tiles [n, 3, T, T], grid) or an error
    (:func:`describe_error`: a PageError's sentence naming the file, page and cause)."""
    out = {"page_id": [], "mode": [], "global_view": [], "tiles": [], "grid": [], "error": []}
    n = len(batch["page_id"])
    fields = [[batch[k][i] if k in batch else default for i in range(n)]
              for k, default in zip(_REF_FIELDS[1:], (-1, "", -1, ""))]
    for page_id, path, mode, *ref in zip(batch["page_id"], batch["path"], batch["mode"], *fields):
        try:
            views = pages_io.preprocess_page(read_page(str(path), *ref), str(mode), max_crops, model, alpha=alpha,
                                             max_pixels=max_pixels, password=password)
            g = _to_u8(views.global_view)
            t = _to_u8(views.tiles) if views.tiles is not None else np.zeros((0, 3, 0, 0), np.uint8)
            grid, error = np.array(views.grid, np.int32), ""
        except Exception as e:   # reported with the page's id; the other pages go on
            g, t, grid, error = np.zeros((3, 0, 0), np.uint8), np.zeros((0, 3, 0, 0), np.uint8), np.zeros(2, np.int32), _describe(e)
        for key, value in zip(out, (str(page_id), str(mode), g, t, grid, error)):
            out[key].append(value)
    return _columns(out)


_describe = describe_error


def _columns(out: dict) -> dict:
    # ragged arrays go to Ray as lists of arrays (its variable-shaped tensor columns); same shapes stack
    cols = {}
    for key, values in out.items():
        if values and isinstance(values[0], np.ndarray):
            same = all(v.shape == values[0].shape for v in values)
            cols[key] = np.stack(values) if same else values
        else:
            cols[key] = np.array(values, dtype=object)
    return cols


# ---- the encoder actor --------------------------------------------------------------------------


@dataclass
class EncoderSpec:
    """Builds the encoder inside each actor: ``weights`` (a checkpoint file or folder) or seeded
    random weights, of generation ``model`` ("v1" DeepEncoder, "v2" DeepEncoderV2); ``factory`` (a
    picklable callable returning an encoder) overrides both."""

    weights: str | None = None
    seed: int = 0
    factory: Callable | None = None
    model: str = "v1"

    def build(self):
        if self.factory is not None:
            return self.factory()
        if self.weights is None:
            from .profiler import random_encoder

            return random_encoder(self.seed, model=self.model)
        from .modules import DeepEncoder, DeepEncoderV2

        enc = DeepEncoderV2() if self.model == "v2" else DeepEncoder()
        enc.load_checkpoint(self.weights)
        return enc


class EncodeActor:
    """One model per actor; ``__call__`` encodes a batch of preprocessed pages, packed."""

    def __init__(self, spec: EncoderSpec, device: str | None = None, dtype: str = "auto", backend: str = "auto"):
        self.backend = backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":   # encode's rule: bf16, unless this CPU only emulates it (measured): then fp32
            from .profiler import choose_timing_dtype

            self.dtype = choose_timing_dtype(torch.bfloat16, self.device)[0]
        else:
            self.dtype = getattr(torch, dtype)
        self.enc = spec.build().to(self.device, self.dtype).eval()

    def __call__(self, batch: dict) -> dict:
        from .dispatch import backend
        from .preprocess import Views

        n = len(batch["page_id"])
        errors = [str(e) for e in batch["error"]]
        todo = [i for i in range(n) if not errors[i]]
        views = {i: Views(_from_u8(batch["global_view"][i]),
                          _from_u8(batch["tiles"][i]) if batch["tiles"][i].shape[0] else None,
                          tuple(int(v) for v in batch["grid"][i])) for i in todo}
        tokens: dict[int, torch.Tensor] = {}
        with backend(self.backend):
            try:
                if todo:
                    tokens.update(zip(todo, pages_io.encode_views_batch(self.enc, [views[i] for i in todo])))
            except Exception:   # find the page(s) at fault: each alone
                for i in todo:
                    try:
                        tokens[i] = pages_io.encode_views_batch(self.enc, [views[i]])[0]
                    except Exception as e:
                        errors[i] = _describe(e)
        out = {"page_id": [], "mode": [], "tokens": [], "n_tokens": [], "dtype": [], "error": []}
        for i in range(n):
            t = tokens.get(i)
            raw = t.contiguous().cpu().view(torch.uint8).numpy() if t is not None else np.zeros((0, 0), np.uint8)
            for key, value in zip(out, (str(batch["page_id"][i]), str(batch["mode"][i]), raw,
                                        0 if t is None else t.shape[0], "" if t is None else str(t.dtype).removeprefix("torch."),
                                        errors[i])):
                out[key].append(value)
        return _columns(out)


def tokens_of(row: dict) -> torch.Tensor:
    """A result row's token tensor ``[n_tokens, dim]`` in the model's dtype."""
    raw = np.array(row["tokens"], copy=True)   # Ray's batches are read-only views
    return torch.from_numpy(raw).view(getattr(torch, str(row["dtype"]))).reshape(int(row["n_tokens"]), -1)


# ---- the pipeline -------------------------------------------------------------------------------


def build_dataset(pages: list[dict], spec: EncoderSpec, *, batch_size: int = 8, concurrency: int | None = None,
                  num_gpus: float | None = None, device: str | None = None, dtype: str = "auto", backend: str = "auto",
                  max_crops: int | None = None, preprocess_cpus: float = 1, alpha: str = "white",
                  max_pixels: int | None = MAX_PIXELS, password: str | None = None):
    """The Ray Data pipeline over page items that carry a ``mode``; lazy: nothing runs until consumed.
    ``num_gpus`` per actor defaults to 1 when the cluster has GPUs, else 0 (CPU actors);
    ``concurrency`` (actors) defaults to the cluster's GPUs, or 1 on CPU. A dead encoder actor is
    restarted and its batch retried: Ray Data's actor pools default to ``max_restarts=-1``,
    ``max_task_retries=-1`` (preprocessing tasks are retried as tasks)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus is None:
        num_gpus = 1 if gpus else 0
    if concurrency is None:
        concurrency = max(1, int(gpus // num_gpus)) if num_gpus else 1
    ds = ray.data.from_items(pages)
    ds = ds.map_batches(preprocess_batch, batch_size=1, num_cpus=preprocess_cpus,
                        fn_kwargs={"max_crops": max_crops, "model": spec.model, "alpha": alpha, "max_pixels": max_pixels,
                                   "password": password})
    return ds.map_batches(EncodeActor, fn_constructor_args=(spec, device, dtype, backend), batch_size=batch_size,
                          concurrency=concurrency, num_gpus=num_gpus, num_cpus=0 if num_gpus else 1)


@dataclass
class Summary:
    pages: int
    encoded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)    # (page id, error)
    duplicates: int = 0                                             # page ids that arrived twice (written once)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.encoded / self.seconds if self.seconds else 0.0
        return (f"{self.encoded}/{self.pages} pages encoded, {len(self.failed)} failed, {self.duplicates} duplicates dropped, "
                f"{len(self.files)} file(s), {self.seconds:.1f} s ({rate:.2f} pages/s)")


class _ShardWriter:
    """Shards of ``shard_pages`` pages. safetensors: each page's bytes go to disk as it arrives
    (``encode``'s TokenWriter; the header is written when the shard closes); parquet: one shard's
    rows are held, then written as one file."""

    def __init__(self, out: Path, fmt: str, shard_pages: int):
        self.out, self.fmt, self.shard_pages = out, fmt, shard_pages
        self.files: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.modes: dict[str, str] = {}
        self.rows: list[tuple[str, str, torch.Tensor]] = []   # parquet only
        self.tokens_writer = None                               # safetensors only

    def _path(self) -> Path:
        return self.out / f"tokens-{len(self.files):05d}.{self.fmt}"

    def add(self, page_id: str, mode: str, tokens: torch.Tensor) -> None:
        if self.fmt == "safetensors":
            if self.tokens_writer is None:
                self.tokens_writer = pages_io.TokenWriter(self._path())
            self.tokens_writer.add(page_id, tokens)
            self.dim = tokens.shape[1]
        else:
            self.rows.append((page_id, mode, tokens))
        self.modes[page_id] = mode
        if len(self.modes) >= self.shard_pages:
            self.flush()

    def flush(self) -> None:
        if not self.modes:
            return
        path = self._path()
        if self.fmt == "safetensors":   # encode's metadata, plus each page's mode
            self.tokens_writer.close({"page_ids": json.dumps(list(self.modes)), "modes": json.dumps(self.modes),
                                      "dim": str(self.dim)})
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({
                "page_id": [p for p, _, _ in self.rows], "mode": [m for _, m, _ in self.rows],
                "n_tokens": [t.shape[0] for _, _, t in self.rows], "dim": [t.shape[1] for _, _, t in self.rows],
                "dtype": [str(t.dtype).removeprefix("torch.") for _, _, t in self.rows],
                "tokens": [t.contiguous().view(torch.uint8).numpy().tobytes() for _, _, t in self.rows],
            })
            pq.write_table(table, str(path))
        self.files.append(str(path))
        self._reset()

    def abort(self) -> None:
        if self.tokens_writer is not None:
            self.tokens_writer.abort()
        self._reset()


def encode_collection(source, output, mode=None, weights: str | None = None, *, encoder_factory: Callable | None = None,
                      fmt: str = "safetensors", shard_pages: int = 256, batch_size: int = 8, concurrency: int | None = None,
                      num_gpus: float | None = None, device: str | None = None, dtype: str = "auto", backend: str = "auto",
                      max_crops: int | None = None, object_store_limit: int | None = None,
                      progress: bool | Callable[[str], None] = True, ray_address: str | None = None,
                      recursive: bool = False, password: str | None = None, alpha: str = "white",
                      max_pixels: int | None = MAX_PIXELS, model: str = "v1") -> Summary:
    """Encode every page of ``source`` (folder, glob, file or a list of them) into ``output`` (a folder).

    ``model``: "v1" (DeepEncoder) or "v2" (DeepEncoderV2; an ``encoder_factory`` must build that
    generation). ``mode``: one mode for all pages (default: v1 base, v2 dynamic), or a callable
    ``page_id -> mode``. Connects to the Ray cluster
    at ``ray_address`` (or starts a local one) unless Ray is already initialised. ``recursive``,
    ``password``, ``alpha``, ``max_pixels``: as ``encode`` takes them (the password travels to the
    preprocessing tasks as an argument). Returns a :class:`Summary`; failed pages are also in
    ``output/errors.jsonl`` and reported through ``progress``.
    """
    import ray

    if fmt not in ("safetensors", "parquet"):
        raise ValueError(f"fmt must be 'safetensors' or 'parquet', got {fmt!r}")
    if not isinstance(shard_pages, int) or shard_pages < 1:
        raise ValueError(f"shard_pages must be a positive int, got {shard_pages!r}")
    if alpha not in pages_io.ALPHA:
        raise ValueError(f"alpha must be one of {pages_io.ALPHA}, got {alpha!r}")
    pages = list_pages(source, recursive, password)
    if not pages:
        raise ValueError("source: no pages to encode (the folders hold no image or PDF files)")
    mode = mode or ("dynamic" if model == "v2" else "base")
    for page in pages:
        page["mode"] = mode(page["page_id"]) if callable(mode) else mode
        try:
            cfg.mode_of(page["mode"], model)
        except ValueError as e:
            raise ValueError(f"{e} (page {page['page_id']})") from None
    to_stderr = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    say = progress if callable(progress) else to_stderr if progress else (lambda s: None)
    warn = progress if callable(progress) else to_stderr       # failed pages: reported even without progress lines
    if not ray.is_initialized():
        ray.init(address=ray_address)
    options = ray.data.DataContext.get_current().execution_options
    limits = options.resource_limits
    if object_store_limit is not None:   # this run's budget; the context's own is put back after it
        options.resource_limits = limits.copy(object_store_memory=object_store_limit)
    try:
        return _run(pages, Path(output), EncoderSpec(weights=weights, factory=encoder_factory, model=model), say, fmt, shard_pages,
                    dict(batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus, device=device, dtype=dtype,
                         backend=backend, max_crops=max_crops, alpha=alpha, max_pixels=max_pixels, password=password),
                    warn)
    finally:
        options.resource_limits = limits


def _run(pages, out: Path, spec: EncoderSpec, say, fmt: str, shard_pages: int, options: dict, warn=None) -> Summary:
    warn = warn or say
    out.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(pages, spec, **options)
    summary, writer, seen = Summary(pages=len(pages)), _ShardWriter(out, fmt, shard_pages), set()
    start, last = time.perf_counter(), 0.0
    with open(out / "errors.jsonl", "w") as errors:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["page_id"])):
                    row = {k: batch[k][i] for k in batch}
                    page_id = str(row["page_id"])
                    if page_id in seen:
                        summary.duplicates += 1
                        continue
                    seen.add(page_id)
                    if row["error"]:
                        summary.failed.append((page_id, str(row["error"])))
                        errors.write(json.dumps({"page_id": page_id, "error": str(row["error"])}) + "\n")
                        warn(f"page {page_id} failed: {row['error']}")
                    else:
                        writer.add(page_id, str(row["mode"]), tokens_of(row))
                        summary.encoded += 1
                now = time.perf_counter() - start
                if now - last >= 5 or len(seen) == len(pages):
                    last = now
                    say(f"[encode] {len(seen)}/{len(pages)} pages ({len(summary.failed)} failed), "
                        f"{len(seen) / max(now, 1e-9):.2f} pages/s")
        except BaseException:
            writer.abort()   # no half-written shard left behind; the closed ones stay
            raise
    writer.flush()
    summary.files, summary.seconds = writer.files, time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps({**summary.__dict__, "failed": [list(f) for f in summary.failed]}, indent=1))
    return summary


def read_tokens(output) -> dict[str, torch.Tensor]:
    """Every page's tokens in an ``encode_collection`` output folder (either format), by page id."""
    found = {}
    for path in sorted(Path(output).glob("tokens-*")):
        if path.suffix == ".safetensors":
            found.update(pages_io.load_tokens(path)[0])
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for row in pq.read_table(str(path)).to_pylist():
                t = torch.frombuffer(bytearray(row["tokens"]), dtype=torch.uint8).view(getattr(torch, row["dtype"]))
                found[row["page_id"]] = t.reshape(row["n_tokens"], row["dim"])
    return found


def add_ray_arguments(parser) -> None:
    """The options only the Ray pipeline has (``encode --ray`` and ``python -m deepencoder_kernels.ray``)."""
    g = parser.add_argument_group("Ray (with --ray)")
    g.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--format", dest="fmt", default="safetensors", choices=["safetensors", "parquet"])
    g.add_argument("--shard-pages", type=int, default=256, help="pages per output file")
    g.add_argument("--concurrency", type=int, help="encoder actors (default: one per GPU, 1 on CPU)")
    g.add_argument("--num-gpus", type=float, help="GPUs per encoder actor (default: 1 if the cluster has GPUs)")
    g.add_argument("--object-store-mib", type=int, help="object store budget of the pipeline (default: Ray Data's)")


def run_from_args(args) -> int:
    """``encode``'s arguments (paths, --out as a folder, --mode, --weights, --batch, --max-crops,
    --dtype, --device, --backend, and the page options: --recursive, --password, --alpha,
    --max-pixels) plus :func:`add_ray_arguments`'. Exit status: 1 when any page failed."""
    summary = encode_collection(args.paths, args.out, args.mode, args.weights, fmt=args.fmt, shard_pages=args.shard_pages,
                                batch_size=args.batch, concurrency=args.concurrency, num_gpus=args.num_gpus,
                                device=args.device, dtype=args.dtype, backend=args.backend, max_crops=args.max_crops,
                                ray_address=args.ray_address, progress=not getattr(args, "quiet", False),
                                object_store_limit=args.object_store_mib and args.object_store_mib * 2**20,
                                recursive=args.recursive, password=args.password, alpha=args.alpha,
                                max_pixels=args.max_pixels, model=getattr(args, "model", "v1"))
    print(summary)
    return 1 if summary.failed else 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deepencoder_kernels.ray", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folders, image files and PDFs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="v1", choices=sorted(cfg.MODELS), help="encoder generation: v1 DeepEncoder, v2 DeepEncoder V2")
    parser.add_argument("--mode", help="v1: tiny, small, base, large, gundam (default base); v2: dynamic, base (default dynamic)")
    parser.add_argument("--weights", help="DeepSeek-OCR safetensors file or folder (default: seeded random weights)")
    parser.add_argument("--batch", type=int, default=8, help="pages per packed encoder batch")
    parser.add_argument("--max-crops", type=int, help="tile budget (default: the mode's: v1 Gundam 9, v2 dynamic 6)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16, or float32 on a CPU that only emulates bfloat16 (measured)")
    parser.add_argument("--device", help="the actors' device (default: cuda when an actor has a GPU)")
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "triton-interpret", "cpp"])
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    pages_io.add_page_arguments(parser)
    add_ray_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    # run the importable module's main, so Ray pickles its classes by reference, not from __main__
    from deepencoder_kernels.ray import main as _main

    sys.exit(_main())
