"""Files -> pages -> RGB images: every page a user has, read the same way by ``preprocess``,
``encode``, ``encode --ray`` and the Python API (through :func:`deepencoder_kernels.preprocess.load_image`).

- Listing (:func:`expand_paths`, :func:`list_pages`): folders (sorted, hidden files skipped as a
  shell glob skips them; ``recursive`` for subfolders), glob patterns, and files; a file named
  twice (``a.png ./a.png``, or a folder and a file in it) is read once, under its first name. One
  :class:`PageRef` per page: a PDF page (``path#page=N``, 1-based), a frame of a multi-page image
  (TIFF, GIF, WebP, APNG, DCX: ``path#page=N`` too), or a single-page image (its path). A file that
  cannot be listed (locked or empty PDF, not an image) becomes one ref carrying the error, so it is
  reported in page order with the other failures instead of ending the run.
- Reading (:func:`read_page_image`): pixels at the resolution the views need (JPEG DCT scaling,
  PIL ``reduce``, a capped pdfium scale) for pages far larger than any view, exactly upstream's
  otherwise; a pixel limit; pixel formats made RGB (:func:`to_rgb`); EXIF orientation applied.
- Errors (:class:`PageError`): the file, the page and the cause, never a bare library message.
"""
from __future__ import annotations

import glob
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

PDF_DPI = 144          # PDF pages are rendered at 144 dpi (an A4 page: 1191 x 1684 px), as DeepSeek's PDF script does
PDF_MISSING = ("reading PDF pages needs pypdfium2, which is not installed: "
               "pip install 'deepencoder-kernels[pdf]' (or pip install pypdfium2)")
# Folders and globs pick files by these suffixes (a file named explicitly is read whatever its name).
IMAGE_SUFFIXES = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".dib", ".webp", ".gif",
                  ".pbm", ".pgm", ".ppm", ".pnm", ".jp2", ".j2k", ".jpx", ".dcx", ".pcx", ".avif", ".heic", ".heif")
# Formats whose frames are pages. Others give their first frame only: an MPO is one photo plus its
# previews or depth maps, an ICO one icon at several sizes.
PAGE_FORMATS = frozenset({"TIFF", "GIF", "WEBP", "PNG", "DCX"})
# PIL's own DecompressionBombError threshold (2 x the default Image.MAX_IMAGE_PIXELS), applied to
# the pixels actually decoded or rendered (after any reduction), with the file named.
MAX_PIXELS = 2 * 89_478_485
# Reduce only when every view is at least this many times smaller than what remains after the
# reduction: PIL's ``reducing_gap`` scale, where it calls the result "indistinguishable from fair
# resampling in most cases" (3.0).
REDUCING_GAP = 3
# A PDF page rendered lower keeps every view 4x smaller: pdfium snaps glyphs to its pixel grid, and
# at 3x a Tiny view of a 100-inch text page differed from the 144-dpi one by 2.3 levels on average,
# at 4x by 0.34 (benchmarks/bench_pages.py's poster page; max 55-60 either way, at glyph edges).
PDF_REDUCING_GAP = 4
ALPHA = ("white", "drop")

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}        # EXIF orientation -> what ImageOps.exif_transpose does
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"BM", "BMP"), (b"RIFF", "WebP"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"))


class PageError(ValueError):
    """A page (or a whole file) that cannot be read. ``str()`` is a sentence naming the file, the
    page (1-based, when the file has pages) and the cause: ``x.pdf is password-protected ...``,
    ``y.pdf has no pages``, ``z.jpg is truncated at byte 5120 ...``. Attributes ``path``, ``page``
    (None: the file as a whole) and ``cause`` (the sentence without the file and page)."""

    def __init__(self, path, cause: str, page: int | None = None):
        self.path, self.page, self.cause = str(path), page, cause
        where = self.path if page is None else f"{self.path} page {page}"
        super().__init__(f"{where} {cause}")

    def __reduce__(self):      # Ray and multiprocessing pickle errors: keep the three fields
        return (PageError, (self.path, self.cause, self.page))


def describe_error(error: BaseException) -> str:
    """The message reported for a failed page: a :class:`PageError`'s sentence as it is; any other
    error (one inside the encoder, a bug) with its type."""
    return str(error) if isinstance(error, PageError) else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class PageRef:
    """Where a page comes from. ``index``: the page (0-based) of a PDF or multi-page image, -1 for a
    single-page image file; ``kind``: ``"pdf"`` or ``"image"`` (default: from the suffix); ``frame``:
    the image frame holding the page (PIL's ``seek`` index; default ``max(index, 0)``), which differs
    from ``index`` where frames are not pages (a TIFF's reduced-resolution copies, an APNG's default
    image); ``error``: why the file or page could not be listed (reading the ref raises it)."""
    path: str
    index: int = -1
    kind: str = ""
    frame: int = -1
    error: str = ""

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", "pdf" if Path(self.path).suffix.lower() == ".pdf" else "image")
        if self.frame < 0:
            object.__setattr__(self, "frame", max(self.index, 0))

    @property
    def page_id(self) -> str:
        return self.path if self.index < 0 else f"{self.path}#page={self.index + 1}"

    @property
    def page(self) -> int | None:
        return None if self.index < 0 else self.index + 1


# ---- listing ------------------------------------------------------------------------------------------


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if _visible(p, folder) and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".pdf",))


def expand_paths(paths, recursive: bool = False, name: str = "paths") -> list[Path]:
    """Files, folders and glob patterns -> the files to read, in order.

    A folder gives its image and PDF files (by suffix, sorted by path; names starting with ``.`` are
    skipped, as a shell glob skips them: macOS ``._x.jpg`` resource forks, ``.DS_Store``), its
    subfolders too with ``recursive``. A path that does not exist but contains ``*``, ``?`` or ``[``
    is a glob pattern (``**`` spans folders), expanded sorted; its folders are listed like folders,
    its files filtered by suffix as a folder's are. A file named explicitly is taken whatever its
    suffix (its content says whether it is a PDF or an image). A file reached twice is kept once,
    at its first position and under its first name (the same file: ``os.path.realpath`` agrees).

    Raises FileNotFoundError naming ``name`` for a path that does not exist and a pattern that
    matches nothing: an argument error, found before any page is read.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += _folder_files(path, recursive)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{name}: no file matches {item}")
            for m in matches:
                if m.is_dir():
                    files += _folder_files(m, recursive)
                elif m.suffix.lower() in IMAGE_SUFFIXES + (".pdf",):
                    files.append(m)
        else:
            raise FileNotFoundError(f"{name}: no such file or folder: {path}")
    seen, unique = set(), []
    for f in files:
        key = os.path.normcase(os.path.realpath(f))
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return "pdf"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    try:
        with open(path, "rb") as f:
            return "pdf" if b"%PDF-" in f.read(1024) else "image"
    except OSError:
        return "image"          # reading it fails again, with the cause, as a page


def list_pages(paths, page_count: Callable | None = None, *, recursive: bool = False, password: str | None = None,
               name: str = "paths") -> list[PageRef]:
    """Files, folders and globs (:func:`expand_paths`) -> one :class:`PageRef` per page, in order.
    Reads no pixels: a PDF is opened for its page count, an image for its frames.

    ``page_count(path)`` replaces pdfium's PDF page count (tests, other renderers). A file that
    cannot be listed gives one ref with ``error`` set (its page id: the path); so does the frame
    where a damaged multi-page image stops (its page id: ``path#page=N``). Raises ImportError (PDFs
    without pypdfium2) and FileNotFoundError (missing paths) before reading anything.
    """
    refs: list[PageRef] = []
    for path in expand_paths(paths, recursive, name):
        refs += _file_pages(path, page_count, password)
    return refs


def _file_pages(path: Path, page_count: Callable | None = None, password: str | None = None) -> list[PageRef]:
    if _kind(path) == "pdf":
        try:
            n = page_count(path) if page_count is not None else pdf_page_count(path, password)
        except PageError as e:
            return [PageRef(str(path), kind="pdf", error=e.cause)]
        if n == 0:
            return [PageRef(str(path), kind="pdf", error="has no pages")]
        return [PageRef(str(path), k, "pdf") for k in range(n)]
    frames, error = _image_frames(path)
    if len(frames) == 1 and not error:
        return [PageRef(str(path), -1, "image", frames[0])]
    refs = [PageRef(str(path), k, "image", f) for k, f in enumerate(frames)]
    if error:   # the frame where the file stops being readable, or the whole file
        refs.append(PageRef(str(path), len(frames) if frames else -1, "image", error=error.cause))
    return refs


def _image_frames(path: Path) -> tuple[list[int], PageError | None]:
    """The frames of an image file that are pages, and the error where counting them stopped."""
    _heif_opener()
    try:
        with _pil_limit_lifted(), open(path, "rb") as f, Image.open(f) as im:
            if im.format not in PAGE_FORMATS:
                return [0], None
            try:
                n = im.n_frames
            except Exception:      # a damaged file: count the frames that can be reached
                n = None
            if n is not None and im.format != "TIFF":
                skip = im.format == "PNG" and bool(im.info.get("default_image"))    # APNG: not a frame of the animation
                return list(range(int(skip), n)) or [0], None
            frames, k = [], 0
            while n is None or k < n:
                try:
                    im.seek(k)
                except EOFError:
                    break
                except Exception as e:
                    return frames, _decode_error(path, len(frames) + 1 if frames else None, e)
                if not (im.format == "TIFF" and _tiff_not_a_page(im)):
                    frames.append(k)
                k += 1
            return frames or [0], None
    except Exception as e:
        return [], _decode_error(path, None, e)


def _tiff_not_a_page(im) -> bool:
    # NewSubfileType (254): bit 0 a reduced-resolution copy of another page (pyramids, thumbnails),
    # bit 2 a transparency mask; neither is a page of the document (libtiff's tiffinfo, GDAL agree)
    return bool(int(im.tag_v2.get(254, 0)) & 0b101)


# ---- PDFs ------------------------------------------------------------------------------------------------

_PDFIUM_LOCK = threading.RLock()     # pdfium is not thread-safe


def _pdfium():
    try:
        import pypdfium2
    except ImportError as e:
        raise ImportError(PDF_MISSING) from e
    return pypdfium2


def _file_size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise PageError(path, f"cannot be read: {e.strerror or e}") from e


_NO_SUCH_PDF = f"{os.devnull}/deepencoder-kernels-no-such-file.pdf".encode()


def _open_pdf(path, password: str | None):
    """pdfium's document, or a PageError with the cause.

    pdfium keeps one last-error code for the process, and some failures set none (a PDF with no
    pages fails to load with the code left at "success", or at the previous file's "password"):
    that is how one file's error showed in the next file's message. So the code is first set to
    FPDF_ERR_FILE by opening a path that cannot exist; after a failure on a file this function has
    just read itself, a code still at FILE means pdfium gave no reason, and the file is inspected.
    """
    pdfium = _pdfium()
    size = _file_size(path)
    if size == 0:
        raise PageError(path, "is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise PageError(path, f"cannot be read: {e.strerror or e}") from e
    import pypdfium2.raw as pdfium_c

    assert not pdfium_c.FPDF_LoadDocument(_NO_SUCH_PDF, None)       # last error := FPDF_ERR_FILE (2)
    try:
        return pdfium.PdfDocument(str(path), password=password)
    except pdfium.PdfiumError as e:
        code = pdfium_c.FPDF_GetLastError()
        if code == 4:      # FPDF_ERR_PASSWORD
            if password is None:
                cause = "is password-protected: give its password with --password (password= in Python)"
            else:
                cause = "is password-protected and the password given does not open it"
        elif code == 5:    # FPDF_ERR_SECURITY
            cause = "is encrypted with a security handler pdfium does not support"
        else:
            with open(path, "rb") as f:
                data = f.read() if code == 2 else b""
                f.seek(max(0, size - 1024))
                tail = f.read()
            if b"%PDF-" not in head:
                cause = f"is not a PDF (it starts with {head[:20]!r})"
            elif b"%%EOF" not in tail:
                cause = f"is truncated at byte {size} (no %%EOF end marker) and pdfium cannot repair it"
            elif code == 2 and re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Type\s*/Page(?![a-zA-Z])", data):
                cause = "has no pages"
            else:
                cause = "is damaged: pdfium cannot parse it" + (" (and gives no reason)" if code == 2 else "")
        raise PageError(path, cause) from e


def pdf_page_count(path, password: str | None = None) -> int:
    """Pages in a PDF. Raises PageError (locked, damaged, not a PDF) and ImportError (no pypdfium2)."""
    with _PDFIUM_LOCK:
        doc = _open_pdf(path, password)
        try:
            return len(doc)
        finally:
            doc.close()


def render_pdf_page(path, index: int, dpi: float = PDF_DPI, password: str | None = None,
                    view_sizes: Callable | None = None, max_pixels: int | None = MAX_PIXELS):
    """Page ``index`` (0-based) of a PDF as an RGB PIL image, on white, at ``dpi`` (pdfium's size:
    the page's points times dpi / 72, rounded up), or lower when ``view_sizes`` says every view is
    more than ``2 * REDUCING_GAP`` times smaller (:func:`_pdf_scale`): a 100-inch page for a Tiny
    view is rendered at 2048 px, not 14400. Raises PageError naming the file and page."""
    with _PDFIUM_LOCK:
        doc = _open_pdf(path, password)
        try:
            n = len(doc)
            if n == 0:
                raise PageError(path, "has no pages")
            if not 0 <= index < n:
                raise PageError(path, f"has {n} pages, not a page {index + 1}")
            try:
                page = doc[index]
            except _pdfium().PdfiumError as e:
                raise PageError(path, "cannot be loaded by pdfium (a damaged page)", index + 1) from e
            try:
                w_pt, h_pt = page.get_size()
                if not (w_pt > 0 and h_pt > 0):
                    raise PageError(path, f"has an empty page box ({w_pt} x {h_pt} pt)", index + 1)
                scale = _pdf_scale(w_pt, h_pt, dpi / 72, view_sizes)
                size = (math.ceil(w_pt * scale), math.ceil(h_pt * scale))
                _check_pixels(path, index + 1, size, max_pixels)
                try:
                    image = page.render(scale=scale).to_pil()
                except _pdfium().PdfiumError as e:
                    raise PageError(path, f"cannot be rendered by pdfium at {size[0]} x {size[1]} px", index + 1) from e
            finally:
                page.close()
        finally:
            doc.close()
    return image if image.mode == "RGB" else image.convert("RGB")


def _pdf_scale(w_pt: float, h_pt: float, scale: float, view_sizes: Callable | None) -> float:
    """The render scale: ``scale``, or, when every view is more than ``2 * REDUCING_GAP`` times
    smaller than the page rendered at ``scale`` on both axes (the images' rule, :func:`reduction`),
    the scale leaving every view exactly ``PDF_REDUCING_GAP`` times smaller (rendering has no blocks
    to keep whole, so the scale need not be 1/k), provided the views keep their geometry."""
    size = (math.ceil(w_pt * scale), math.ceil(h_pt * scale))
    if view_sizes is None:
        return scale
    sizes = view_sizes(*size)
    room = min(min(size[0] / max(w, 1), size[1] / max(h, 1)) for w, h in sizes) if sizes else 0
    if room < 2 * REDUCING_GAP:
        return scale
    for nudge in (1.0, 1.01, 1.02, 1.05, 1.1):          # a page whose aspect rounds differently: a little larger
        reduced = scale * PDF_REDUCING_GAP / room * nudge
        if view_sizes(math.ceil(w_pt * reduced), math.ceil(h_pt * reduced)) == sizes:
            return reduced
    return scale


# ---- images ------------------------------------------------------------------------------------------------

_LIMIT_LOCK = threading.Lock()
_LIMIT_USERS = [0, None]     # readers inside _pil_limit_lifted, PIL's limit to put back


class _pil_limit_lifted:
    """PIL's own decompression-bomb check (on the declared size, at open and seek) is replaced by
    :func:`_check_pixels` on the pixels actually decoded, which names the file and the option. PIL
    has no per-call limit, so ``Image.MAX_IMAGE_PIXELS`` is None while any page is being opened (and
    put back after the last); other threads opening images meanwhile go unchecked."""

    def __enter__(self):
        with _LIMIT_LOCK:
            if _LIMIT_USERS[0] == 0:
                _LIMIT_USERS[1] = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            _LIMIT_USERS[0] += 1

    def __exit__(self, *exc):
        with _LIMIT_LOCK:
            _LIMIT_USERS[0] -= 1
            if _LIMIT_USERS[0] == 0:
                Image.MAX_IMAGE_PIXELS = _LIMIT_USERS[1]


def _check_pixels(path, page, size, max_pixels) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise PageError(path, f"is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                              "(a guard against decompression bombs): raise it with --max-pixels N "
                              "(max_pixels=N in Python; 0 / None: no limit)", page)


def _heif_opener() -> None:
    """Phones save photos of pages as HEIC: PIL reads them through the pillow-heif plugin, registered
    here when it is installed (it is not a dependency)."""
    if not _HEIF[0]:
        _HEIF[0] = True
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:
            pass


_HEIF = [False]


def _decode_error(path, page, e: BaseException) -> PageError:
    """PIL's exceptions -> the cause, in words."""
    if isinstance(e, PageError):
        return e
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return PageError(path, f"cannot be read: {e.strerror or e}", page)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as err:
        return PageError(path, f"cannot be read: {err.strerror or err}", page)
    if isinstance(e, MemoryError):
        return PageError(path, "needs more memory to decode than there is", page)
    if size == 0:
        return PageError(path, "is empty (0 bytes)", page)
    if isinstance(e, UnidentifiedImageError):
        fmt = next((f for magic, f in _MAGIC if head.startswith(magic)), None)
        if head[4:8] == b"ftyp":    # ISO media: HEIF / HEIC / AVIF
            brand = head[8:12].decode("latin-1")
            return PageError(path, f"is a HEIF image (brand {brand!r}) this PIL cannot read: pip install pillow-heif "
                                   "(registered by this package when installed)", page)
        if fmt:
            return PageError(path, f"starts like a {fmt} file but PIL cannot read its header: damaged or "
                                   f"truncated ({size} bytes)", page)
        return PageError(path, f"is not an image or a PDF (PIL cannot identify it; it starts with {head!r})", page)
    text = str(e)
    if isinstance(e, EOFError) or "truncated" in text.lower():
        return PageError(path, f"is truncated at byte {size} (the file ends before the image does)", page)
    return PageError(path, f"is damaged: PIL cannot decode it ({type(e).__name__}: {text})", page)


def reduction(size, view_sizes: Callable | None, choices: Iterable[int] | None = None) -> int:
    """The integer factor ``k`` a page of ``size = (W, H)`` pixels may be read at (1/k per side).

    ``view_sizes(W, H)``: the (w, h) each view resizes the page to (None: read at full size). ``k``
    is the largest factor with every view at least ``REDUCING_GAP`` times smaller than the reduced
    page on both axes (so only pages more than ``2 * REDUCING_GAP`` times larger than every view
    are reduced) whose reduced size ``(ceil(W / k), ceil(H / k))`` gives
    the views the same geometry (``view_sizes`` equal: same Gundam grid, same letterbox sizes and
    offsets). Factors dividing both sides are preferred: block ``k`` then covers exactly ``k``
    source pixels, while a partial last block stretches the page by up to 1/REDUCING_GAP of an
    output pixel at its far edge. ``choices``: the factors a decoder offers (JPEG: 2, 4, 8).
    """
    if view_sizes is None:
        return 1
    W, H = size
    sizes = view_sizes(W, H)
    if not sizes:
        return 1
    room = min(min(W / max(w, 1), H / max(h, 1)) for w, h in sizes)
    k_max = int(room // REDUCING_GAP)
    if k_max < 2:
        return 1
    candidates = sorted((k for k in (choices or range(2, k_max + 1)) if 2 <= k <= k_max), reverse=True)
    fallback = 1
    for k in candidates:
        if view_sizes(math.ceil(W / k), math.ceil(H / k)) != sizes:
            continue
        if W % k == 0 and H % k == 0:
            return k
        fallback = max(fallback, k)
    return fallback


# GIF, APNG and WebP frames are composed from the frames before them, so PIL reaches frame k by
# decoding frames 1..k: reading a file's N pages each from a fresh open would cost N^2 / 2 frame
# decodes. The file of the last such read stays open (one per thread), and the next page of it
# is one more seek.
_SEQUENTIAL = frozenset({"GIF", "PNG", "WEBP"})
_held = threading.local()


def _release(path=None) -> None:
    held = getattr(_held, "image", None)
    if held is not None and (path is None or held[0] == os.path.realpath(path)):
        _held.image = None
        held[2].close()


def _open_at(path, frame: int):
    """A PIL image of ``path`` seeked to ``frame``, and its file for the caller to close after
    loading (None: the image is the held one, left open)."""
    key = os.path.realpath(path)
    stat = os.stat(path)
    held = getattr(_held, "image", None)
    if held is not None and held[0] == key and held[1] == (stat.st_mtime_ns, stat.st_size) and held[3].tell() <= frame:
        held[3].seek(frame)
        return held[3], None
    _release()
    f = open(path, "rb")
    try:
        im = Image.open(f)
        sequential = im.format in _SEQUENTIAL and getattr(im, "n_frames", 1) > 1
        if sequential:
            _held.image = (key, (stat.st_mtime_ns, stat.st_size), f, im)
        if frame:
            im.seek(frame)
    except BaseException:
        _release(path)
        f.close()
        raise
    return im, None if sequential else f


def read_image_frame(path, frame: int = 0, page: int | None = None, *, view_sizes: Callable | None = None,
                     alpha: str = "white", max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Frame ``frame`` of an image file -> RGB: EXIF orientation applied, decoded at 1/k per side
    (:func:`reduction`: JPEG's DCT scaling, then PIL's ``reduce``) when the views need far less,
    then :func:`to_rgb`. Raises PageError naming the file and ``page``."""
    _heif_opener()
    try:
        with _pil_limit_lifted():
            im, f = _open_at(path, frame)
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                w, h = im.size
                display = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
                drafted = False
                if im.format in ("JPEG", "MPO") and frame == 0:     # libjpeg decodes at 1/2, 1/4, 1/8 directly
                    s = reduction(display, view_sizes, choices=(8, 4, 2))
                    drafted = s > 1 and im.draft(None, (w // s, h // s)) is not None
                _check_pixels(path, page, im.size, max_pixels)
                im.load()
                tags = _sample_tags(im)
                # read again after loading, as ImageOps.exif_transpose does: PIL's TIFF loader may have
                # applied the orientation itself (and removed the tag)
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                if f is None:           # the held image moves on to the next frame: this one is copied out
                    im = im.copy()
            except BaseException:
                _release(path)
                raise
            finally:
                if f is not None:
                    f.close()
        k = 1 if drafted else reduction(display, view_sizes)      # other formats: reduced after decoding
        if k > 1:
            im = _reduce(im, k)
        if orientation in _TRANSPOSE:       # after reducing: a reduced page is never copied at full size
            im = im.transpose(_TRANSPOSE[orientation])
        return to_rgb(im, alpha, tags)
    except PageError:
        raise
    except Exception as e:
        raise _decode_error(path, page, e) from e


def _reduce(image: Image.Image, k: int) -> Image.Image:
    # PIL's reduce (box average) takes no "1", "P" or 16-bit modes: make those reducible first,
    # keeping alpha and the full sample range (I;16 -> I is exact)
    if image.mode in ("1", "P", "PA"):         # PA: averaging palette indices means nothing
        image = image.convert("RGBA" if _has_alpha(image) else ("L" if image.mode == "1" else "RGB"))
    elif image.mode.startswith("I;16"):
        image = image.convert("I") if not image.mode.endswith("S") else Image.fromarray(np.asarray(image).astype(np.int32))
    return image.reduce(k)


def _sample_tags(im) -> dict:
    """What a TIFF says of its samples (bits, signed / float, declared min / max), for to_rgb."""
    tags = getattr(im, "tag_v2", None)
    if not tags:
        return {}
    first = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    return {key: first(tags[tag]) for key, tag in (("bits", 258), ("format", 339), ("min", 340), ("max", 341)) if tag in tags}


# ---- pixel formats ------------------------------------------------------------------------------------------

_WIDE = ("I", "F")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _sample_range(image: Image.Image, values: np.ndarray, tags: dict) -> tuple[float, float]:
    """The range of a wide (16/32-bit, float) sample type, mapped onto 0..255."""
    if values.dtype.kind in "ui" and values.dtype.itemsize == 2:      # I;16 (any byte order), I;16S
        info = np.iinfo(values.dtype)
        return float(info.min), float(info.max)
    if "min" in tags and "max" in tags and float(tags["max"]) > float(tags["min"]):   # TIFF S{Min,Max}SampleValue
        return float(tags["min"]), float(tags["max"])
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if values.dtype.kind in "ui":
        bits, signed = tags.get("bits"), tags.get("format") == 2
        if bits in (8, 16):
            return (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
        if lo >= 0:
            # mode I holds 8 and 16-bit samples too (PGM, some PNG and TIFF readers): the smallest
            # unsigned range that holds the data (0..255 is what PIL's own conversion assumes)
            return 0.0, next(2.0 ** b - 1 for b in (8, 16, 32) if hi <= 2.0 ** b - 1)
        return -(2.0 ** 31), 2.0 ** 31 - 1
    # float: no fixed range; 0..1 (the usual convention), 0..255 (PIL's), 0..65535 (16-bit data
    # stored as float) when the data fit, else the data's own extent (as ImageJ shows a float image)
    if lo >= 0:
        for top in (1.0, 255.0, 65535.0):
            if hi <= top:
                return 0.0, top
    return lo, hi if hi > lo else lo + 1


def _wide_to_l(image: Image.Image, tags: dict) -> Image.Image:
    values = np.asarray(image)
    lo, hi = _sample_range(image, values, tags)
    out = np.empty(values.shape, np.uint8)
    rows = max(1, (1 << 22) // max(values.shape[1], 1))       # in slabs: no full-size float copy
    for r in range(0, values.shape[0], rows):
        v = values[r:r + rows].astype(np.float64)
        if values.dtype.kind == "f":
            v = np.nan_to_num(v, nan=lo, posinf=hi, neginf=lo)
        np.clip(np.rint((v - lo) * (255.0 / (hi - lo))), 0, 255, out=v)
        out[r:r + rows] = v
    return Image.fromarray(out, "L")


def to_rgb(image: Image.Image, alpha: str = "white", tags: dict | None = None) -> Image.Image:
    """Any PIL mode -> RGB, as a person sees the page:

    - alpha (RGBA, LA, PA, RGBa, a palette or grey or RGB image with a transparent index or colour)
      composited onto white, as vLLM's loader does for the RGBA images it serves this model
      (``Image.new("RGB", size, white).paste(rgba, mask=alpha)``; the same call here for every
      alpha mode), so black text on a transparent page reads as black text on white. ``alpha="drop"``
      is DeepSeek's own ``infer``: ``convert("RGB")`` discards alpha, and a transparent page shows
      the colour stored under it (black, for most, so the text disappears).
    - 16 and 32-bit integer and float samples (I;16, I;16B, I;16S, I, F) scaled linearly from their
      type's range to 0..255, rounded; not clipped at 255 as ``convert`` does (which whites out a
      16-bit scan). The range: 0..65535 for I;16 (-32768..32767 signed); for I and F what the TIFF
      declares (SMin/SMaxSampleValue, else BitsPerSample and SampleFormat); otherwise for I the
      smallest unsigned 8/16/32-bit range holding the data (PIL decodes 8 and 16-bit samples into I
      too), the signed 32-bit range for negative data; for F 0..1, 0..255 or 0..65535, the first
      holding the data, else the data's own extent.
    - everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) as PIL's ``convert("RGB")`` does.
    ``tags``: what the file declares of its samples (:func:`_sample_tags`). An RGB image is returned
    as it is. Raises ValueError for ``alpha`` other than "white" or "drop".
    """
    if alpha not in ALPHA:
        raise ValueError(f"alpha must be one of {ALPHA}, got {alpha!r}")
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    transparent = _has_alpha(image)
    if mode.startswith("I;16") or mode in _WIDE:
        values_l = _wide_to_l(image, tags or {})
        if not transparent or alpha == "drop":
            return values_l.convert("RGB")
        key = image.info["transparency"]          # a grey value marked transparent (PNG tRNS)
        mask = Image.fromarray(((np.asarray(image) != key) * 255).astype(np.uint8), "L")
        values_l.putalpha(mask)
        image, mode = values_l, "LA"
    if not transparent or alpha == "drop":
        return image.convert("RGB")
    rgba = image if mode == "RGBA" else image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


# ---- one entry point --------------------------------------------------------------------------------------

_PAGE_SUFFIX = re.compile(r"^(?P<path>.+)#page=(?P<page>[1-9][0-9]*)$")


def _locate(path: Path, page: int | None, password: str | None) -> PageRef:
    """A path (and 1-based page) -> its ref, with the frame mapping a listing would give it."""
    if not path.is_file():
        raise PageError(path, "is not a file (a folder? list its pages with deepencoder_kernels.encode.list_pages)")
    refs = _file_pages(path, password=password)
    good = [r for r in refs if not r.error]
    if page is None:
        if len(good) > 1:
            import warnings

            warnings.warn(f"{path} has {len(good)} pages; reading page 1 (pass '{path}#page=N' for page N, or list "
                          "every page with deepencoder_kernels.encode.list_pages)", stacklevel=4)
        return (good or refs)[0]
    for r in refs:
        if (r.index < 0 and page == 1) or r.index == page - 1:
            return r
    raise PageError(path, f"has {len(good)} page{'s' * (len(good) != 1)}, not a page {page}")


def read_page_image(source, *, view_sizes: Callable | None = None, alpha: str = "white",
                    max_pixels: int | None = MAX_PIXELS, password: str | None = None) -> Image.Image:
    """A page -> RGB PIL image; the body of :func:`deepencoder_kernels.preprocess.load_image` (whose
    docstring says what each input gives)."""
    if alpha not in ALPHA:
        raise ValueError(f"alpha must be one of {ALPHA}, got {alpha!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0):
        raise ValueError(f"max_pixels must be a non-negative int (0 or None: no limit), got {max_pixels!r}")
    max_pixels = max_pixels or None
    if isinstance(source, Image.Image):
        return to_rgb(source, alpha, _sample_tags(source))
    if isinstance(source, (str, os.PathLike)):
        path, page = Path(source), None
        if not path.exists() and (m := _PAGE_SUFFIX.match(str(source))) and Path(m["path"]).exists():
            path, page = Path(m["path"]), int(m["page"])
        if not path.exists():
            raise FileNotFoundError(f"image: no such file: {source}")
        source = _locate(path, page, password)
    if not isinstance(source, PageRef):
        raise TypeError(f"image must be a PIL image or a path (or a PageRef), got {type(source).__name__}")
    if source.error:
        raise PageError(source.path, source.error, source.page)
    if source.kind == "pdf":
        return render_pdf_page(source.path, max(source.index, 0), password=password, view_sizes=view_sizes,
                               max_pixels=max_pixels)
    return read_image_frame(source.path, source.frame, source.page, view_sizes=view_sizes, alpha=alpha,
                            max_pixels=max_pixels)
