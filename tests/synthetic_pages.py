"""Synthetic pages for the page-reading tests and benchmarks/bench_pages.py: text pages in any PIL
mode, multi-frame files, and PDFs written by hand (text in Helvetica, any page size, optionally
encrypted with the standard security handler, RC4 40-bit, revision 2, per the PDF 1.7 spec,
section 7.6.3) so that locked, empty and cut PDFs need no tool beyond Python. No personal data."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = "optical context compression vision tokens encoder page scan table figure".split()


def text_page(width: int = 600, height: int = 800, seed: int = 0, ink=0, paper=255, mode: str = "L") -> Image.Image:
    """Lines of dark text on a light page (antialiased TrueType text, PIL's default font)."""
    rng = np.random.default_rng(seed)
    page = Image.new(mode, (width, height), paper)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=max(10, height // 40))
    for y in range(height // 20, height - height // 20, max(14, height // 28)):
        draw.text((width // 20, y), " ".join(rng.choice(WORDS, 6)), fill=ink, font=font)
    return page


def coverage(width: int = 600, height: int = 800, seed: int = 0) -> np.ndarray:
    """The text's coverage (0..255 ink) of :func:`text_page`: the alpha of the same text on a transparent page."""
    return 255 - np.asarray(text_page(width, height, seed))


def rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _padded(password: str) -> bytes:
    return (password.encode("latin-1") + _PAD)[:32]


def make_pdf(pages, password: str | None = None, kids=True, owner: str | None = None) -> bytes:
    """``pages``: [(width_pt, height_pt, [lines of text])] -> a PDF's bytes (one Helvetica text block
    per page, sized to the page). ``password``: the user password (RC4 40-bit, revision 2);
    ``owner``: the owner password (default: the user password; ``password=""`` with an owner
    password is a PDF that opens for anyone, with restricted permissions). ``kids=False``: a page
    tree with no pages (``/Count 0``)."""
    file_id = hashlib.md5(repr(pages).encode()).digest()
    objects: dict[int, bytes] = {}
    n_pages = len(pages) if kids else 0
    page_nums = [4 + 2 * i for i in range(n_pages)]
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[2] = b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % n for n in page_nums) + b"] /Count %d >>" % n_pages
    objects[3] = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    key = None
    if password is not None:
        o = rc4(hashlib.md5(_padded(password if owner is None else owner)).digest()[:5], _padded(password))
        perms = -44
        key = hashlib.md5(_padded(password) + o + perms.to_bytes(4, "little", signed=True) + file_id).digest()[:5]
        u = rc4(key, _PAD)
    streams = {}
    for i, (w, h, lines) in enumerate(pages[:n_pages]):
        size = max(6.0, h / 40)
        ops = [b"BT /F1 %.2f Tf %.2f TL %.2f %.2f Td" % (size, size * 1.4, w * 0.05, h - 2 * size)]
        for line in lines:
            ops.append(b"(" + line.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b") Tj T*")
        ops.append(b"ET")
        streams[page_nums[i] + 1] = b"\n".join(ops)
        objects[page_nums[i]] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.2f %.2f] /Resources << /Font << /F1 3 0 R >> >> "
                                 b"/Contents %d 0 R >>" % (w, h, page_nums[i] + 1))
    for num, data in streams.items():
        if key is not None:   # each object's key: MD5(file key + object number (3 bytes) + generation (2 bytes))
            data = rc4(hashlib.md5(key + num.to_bytes(3, "little") + b"\x00\x00").digest()[:10], data)
        objects[num] = b"<< /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"
    if key is not None:
        objects[max(objects) + 1] = (b"<< /Filter /Standard /V 1 /R 2 /Length 40 /O <" + o.hex().encode() + b"> /U <"
                                     + u.hex().encode() + b"> /P %d >>" % perms)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for num in sorted(objects):
        offsets[num] = len(out)
        out += b"%d 0 obj\n" % num + objects[num] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    trailer = b"<< /Size %d /Root 1 0 R /ID [<%s> <%s>]" % (size, file_id.hex().encode(), file_id.hex().encode())
    if key is not None:
        trailer += b" /Encrypt %d 0 R" % max(objects)
    out += b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def text_pdf(n_pages: int = 2, width: float = 612, height: float = 792, password: str | None = None) -> bytes:
    """n pages of a few lines of text (US Letter by default)."""
    return make_pdf([(width, height, [f"Page {i + 1}: " + " ".join(WORDS[i % 3:i % 3 + 6]) for _ in range(12)])
                     for i in range(n_pages)], password)
