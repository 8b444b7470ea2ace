"""Every page a user has, through the one loader (preprocess.load_image / pages.py): pixel formats
(transparency, 16/32-bit and float samples, the rest as PIL converts them), pages (multi-frame
files, folders, globs, a file named twice), errors that name the file, page and cause (locked,
empty, cut and fake PDFs; truncated and unidentifiable images; pdfium's last error never leaking),
the pixel limit, and bounded work on huge pages with upstream's exact views on normal ones. All
inputs are generated here (tests/synthetic_pages.py)."""
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, TiffImagePlugin

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from deepencoder_kernels import pages as P
from deepencoder_kernels.pages import PageError, list_pages
from synthetic_pages import coverage, make_pdf, text_page, text_pdf

PP = importlib.import_module("deepencoder_kernels.preprocess")
load_image = PP.load_image


@pytest.fixture
def pdfium():
    return pytest.importorskip("pypdfium2", reason="PDF pages need pypdfium2 (in the test extra)")


def rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def upstream_views(image: Image.Image, mode: str) -> torch.Tensor:
    """DeepSeek's global view from an RGB image, written out (tests/test_preprocess.py checks these calls)."""
    S = cfg.MODES[mode].base_size
    source = image if cfg.MODES[mode].letterbox else image.resize((S, S))
    return PP.to_pixels(ImageOps.pad(source, (S, S), color=cfg.PAD_GRAY))


# ---- pixel formats --------------------------------------------------------------------------------


def _binary_text(size=(240, 320)):
    return coverage(*size) > 127           # True where the ink is


def transparent_variants(tmp_path):
    """{name: (path, the same page opaque on white)}: every way a file can carry transparency."""
    cov = coverage(240, 320).astype(np.uint8)
    ink = _binary_text()
    opaque = text_page(240, 320).convert("RGB")
    binary_opaque = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).convert("RGB")
    out = {}
    rgba = Image.new("RGBA", opaque.size, (0, 0, 0, 0))          # black text, alpha = coverage
    rgba.putalpha(Image.fromarray(cov))
    rgba.save(tmp_path / "rgba.png")
    rgba.save(tmp_path / "rgba.webp", lossless=True)
    out["rgba.png"] = out["rgba.webp"] = opaque
    Image.merge("LA", [Image.new("L", opaque.size, 0), Image.fromarray(cov)]).save(tmp_path / "la.png")
    out["la.png"] = opaque
    # a palette image whose background index is transparent (GIF, PNG tRNS): binary ink
    p = Image.fromarray(ink.astype(np.uint8), "P")
    p.putpalette([0, 0, 0, 0, 0, 0])                              # index 0 (background) stored black
    p.save(tmp_path / "p.gif", transparency=0)
    p.save(tmp_path / "p.png", transparency=0)
    out["p.gif"] = out["p.png"] = binary_opaque
    # grey and RGB images with a colour key (PNG tRNS): the background's value is transparent
    Image.fromarray(np.where(ink, 0, 7).astype(np.uint8)).save(tmp_path / "l_key.png", transparency=7)
    out["l_key.png"] = binary_opaque
    key = np.where(ink[..., None], 0, np.array([10, 20, 30], np.uint8)).astype(np.uint8)
    Image.fromarray(key, "RGB").save(tmp_path / "rgb_key.png", transparency=(10, 20, 30))
    out["rgb_key.png"] = binary_opaque
    return {name: (tmp_path / name, page) for name, page in out.items()}


def test_transparent_text_reads_as_the_same_text_on_white(tmp_path):
    for name, (path, opaque) in transparent_variants(tmp_path).items():
        loaded = load_image(path)
        assert loaded.mode == "RGB" and np.array_equal(rgb(loaded), rgb(opaque)), name
        for mode in ("tiny", "base"):
            assert torch.equal(dk.preprocess(path, mode).global_view, upstream_views(opaque, mode)), (name, mode)


def test_alpha_drop_is_deepseeks_infer(tmp_path):
    for name, (path, opaque) in transparent_variants(tmp_path).items():
        with Image.open(path) as im:
            upstream = ImageOps.exif_transpose(im).convert("RGB")       # DeepSeek's infer: load_image + convert
        dropped = load_image(path, alpha="drop")
        assert np.array_equal(rgb(dropped), rgb(upstream)), name
    # a transparent page goes black that way (the text is gone); composited it is a page
    assert rgb(load_image(tmp_path / "rgba.png", alpha="drop")).max() == 0
    assert rgb(load_image(tmp_path / "rgba.png")).mean() > 200
    with pytest.raises(ValueError, match="alpha must be one of"):
        load_image(tmp_path / "rgba.png", alpha="black")


def test_pil_images_with_alpha_are_composited_too():
    cov = coverage(240, 320).astype(np.uint8)
    opaque = rgb(text_page(240, 320))
    la = Image.merge("LA", [Image.new("L", (240, 320), 0), Image.fromarray(cov)])
    pa = Image.new("PA", (240, 320))             # (PIL's LA -> PA conversion drops the alpha)
    pa.putpalette([0, 0, 0])
    pa.putalpha(Image.fromarray(cov))
    for image in (la, la.convert("RGBA"), pa, la.convert("RGBA").convert("RGBa")):
        assert np.abs(rgb(load_image(image)) - opaque).max() <= 1, image.mode      # RGBa: premultiplied rounding


def _write_pgm16(path, values):
    h, w = values.shape
    path.write_bytes(b"P5\n%d %d\n65535\n" % (w, h) + values.astype(">u2").tobytes())


def wide_scans(tmp_path):
    """A light page with dark text at 16 and 32 bits and in float: {name: (path or image, expected uint8)}."""
    page = np.asarray(text_page(240, 320)).astype(np.float64) / 255        # 1 paper, 0 ink
    v16 = np.rint(6000 + page * 54000).astype(np.uint16)                     # ink 6000, paper 60000 of 65535
    want16 = np.rint(v16 / 257).astype(np.uint8)                             # 65535 -> 255
    Image.fromarray(v16).save(tmp_path / "scan16.png")                       # PIL reads I;16
    Image.fromarray(v16).save(tmp_path / "scan16.tif")
    Image.frombytes("I;16B", (240, 320), v16.astype(">u2").tobytes()).save(tmp_path / "scan16b.tif")
    _write_pgm16(tmp_path / "scan16.pgm", v16)                               # PIL reads I
    f01 = (0.1 + page * 0.8).astype(np.float32)
    Image.fromarray(f01, "F").save(tmp_path / "float01.tif")
    f16 = (v16.astype(np.float32))
    Image.fromarray(f16, "F").save(tmp_path / "float16.tif")
    i32 = Image.fromarray(v16.astype(np.int32), "I")
    return {
        "scan16.png": (tmp_path / "scan16.png", want16),
        "scan16.tif": (tmp_path / "scan16.tif", want16),
        "scan16b.tif": (tmp_path / "scan16b.tif", want16),
        "scan16.pgm": (tmp_path / "scan16.pgm", want16),
        "float01.tif": (tmp_path / "float01.tif", np.rint(f01.astype(np.float64) * 255).astype(np.uint8)),
        "float16.tif": (tmp_path / "float16.tif", want16),
        "int32 (in memory)": (i32, want16),
    }


def test_a_16_bit_scan_keeps_dark_text_on_a_light_page(tmp_path):
    for name, (source, want) in wide_scans(tmp_path).items():
        got = rgb(load_image(source))
        assert np.array_equal(got, np.repeat(want[..., None], 3, -1)), name
        assert got.mean() > 200 and got.min() < 40, name                     # a light page, dark text
        view = dk.preprocess(source, "tiny").global_view
        assert view.mean() > 0.5 and view.min() < -0.5, name
    # the test can fail: PIL's own conversion (upstream's) clips 16-bit samples to an all-white page
    with Image.open(tmp_path / "scan16.png") as im:
        assert im.mode == "I;16" and rgb(im.convert("RGB")).min() == 255


def test_wide_sample_ranges():
    # I holding 8-bit data keeps PIL's own reading (what upstream gives); negative data: the signed range
    eight = Image.fromarray(np.array([[0, 128, 255]], np.int32), "I")
    assert rgb(load_image(eight))[0, :, 0].tolist() == [0, 128, 255]
    signed = Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], np.int32), "I")
    assert rgb(load_image(signed))[0, :, 0].tolist() == [0, 128, 255]
    # float outside 0..65535: the data's own extent; NaN as the lowest value
    wild = Image.fromarray(np.array([[-5.0, 5.0, np.nan, 15.0]], np.float32), "F")
    assert rgb(load_image(wild))[0, :, 0].tolist() == [0, 128, 0, 255]
    signed16 = Image.frombytes("I;16S", (2, 1), np.array([-32768, 32767], "<i2").tobytes()) if "I;16S" in Image.MODES else None
    if signed16 is not None:
        assert rgb(load_image(signed16))[0, :, 0].tolist() == [0, 255]


def test_other_modes_as_pil_converts_them(tmp_path):
    page = text_page(200, 260)
    cases = {
        "bilevel_g4.tif": lambda p: page.convert("1").save(p, compression="group4"),
        "grey.jpg": lambda p: page.save(p, quality=90),
        "palette.png": lambda p: page.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p),
        "cmyk.jpg": lambda p: page.convert("CMYK").save(p, quality=90),
        "cmyk.tif": lambda p: page.convert("CMYK").save(p),
        "ycbcr.tif": lambda p: page.convert("RGB").convert("YCbCr").save(p),
        "lab.tif": lambda p: page.convert("RGB").convert("LAB").save(p),
        "rgb.bmp": lambda p: page.convert("RGB").save(p),
        "grey.ppm": lambda p: page.save(p),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            want = rgb(im.convert("RGB"))
        assert np.array_equal(rgb(load_image(tmp_path / name)), want), name
    for mode in ("HSV", "RGBX", "YCbCr"):                                   # PIL images in memory
        im = page.convert("RGB").convert(mode)
        assert np.array_equal(rgb(load_image(im)), rgb(im.convert("RGB"))), mode


def test_exif_orientation_of_each_tiff_page(tmp_path):
    path = tmp_path / "turned.tif"
    pages = [text_page(120, 80, seed=s).convert("RGB") for s in range(2)]
    with TiffImagePlugin.AppendingTiffWriter(str(path), True) as tf:
        for page, orientation in zip(pages, (1, 6)):                       # page 2 is stored sideways
            info = TiffImagePlugin.ImageFileDirectory_v2()
            info[274] = orientation
            page.save(tf, format="TIFF", tiffinfo=info)
            tf.newFrame()
    refs = list_pages([path])
    assert [r.page_id for r in refs] == [f"{path}#page=1", f"{path}#page=2"]
    assert np.array_equal(rgb(load_image(refs[0])), rgb(pages[0]))
    assert np.array_equal(rgb(load_image(refs[1])), rgb(pages[1].transpose(Image.Transpose.ROTATE_270)))


# ---- pages ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,kwargs", [(".tif", {}), (".tiff", {"compression": "tiff_lzw"}), (".gif", {}),
                                           (".webp", {"lossless": True}), (".png", {})])
def test_one_page_per_frame(tmp_path, suffix, kwargs):
    frames = [text_page(200, 260, seed=s) for s in range(3)]
    path = tmp_path / f"three{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], **kwargs)
    refs = list_pages([path])
    assert [r.page_id for r in refs] == [f"{path}#page={n}" for n in (1, 2, 3)]
    for ref, frame in zip(refs, frames):
        assert np.array_equal(rgb(load_image(ref)), rgb(frame)), ref.page_id
        assert np.array_equal(rgb(load_image(ref.page_id)), rgb(frame)), ref.page_id      # a page id loads too
    with pytest.warns(UserWarning, match=r"has 3 pages; reading page 1 \(pass '.*#page=N'"):
        assert np.array_equal(rgb(load_image(path)), rgb(frames[0]))
    with pytest.raises(PageError, match=r"three.* has 3 pages, not a page 4"):
        load_image(f"{path}#page=4")


def test_frames_that_are_not_pages(tmp_path):
    pages = [text_page(200, 260, seed=s) for s in range(2)]
    # a TIFF with a reduced-resolution copy (NewSubfileType 1) after each page: two pages
    path = tmp_path / "pyramid.tif"
    with TiffImagePlugin.AppendingTiffWriter(str(path), True) as tf:
        for page in pages:
            for image, subfile in ((page, 0), (page.reduce(4), 1)):
                info = TiffImagePlugin.ImageFileDirectory_v2()
                info[254] = subfile
                image.save(tf, format="TIFF", tiffinfo=info)
                tf.newFrame()
    refs = list_pages([path])
    assert [(r.index, r.frame) for r in refs] == [(0, 0), (1, 2)]
    assert np.array_equal(rgb(load_image(refs[1])), rgb(pages[1]))
    # an APNG whose default image is not part of the animation: the animation's frames are the pages
    apng = tmp_path / "cover.png"
    Image.new("L", (200, 260), 128).save(apng, save_all=True, append_images=pages, default_image=True)
    refs = list_pages([apng])
    assert [r.page_id for r in refs] == [f"{apng}#page=1", f"{apng}#page=2"]
    assert np.array_equal(rgb(load_image(refs[0])), rgb(pages[0]))
    # an MPO (a camera's photo plus a preview) is one page
    mpo = tmp_path / "photo.jpg"
    pages[0].convert("RGB").save(mpo, "MPO", save_all=True, append_images=[pages[1].convert("RGB").reduce(2)])
    with Image.open(mpo) as im:
        assert im.format == "MPO" and im.n_frames == 2
    assert [r.page_id for r in list_pages([mpo])] == [str(mpo)]


def test_folders_globs_and_a_file_named_twice(tmp_path, monkeypatch, pdfium):
    monkeypatch.chdir(tmp_path)
    scans = Path("scans")
    (scans / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png", ".hidden.png", "._a.png"):
        text_page(60, 80).save(scans / name)
    (scans / "notes.txt").write_text("not a page")
    (scans / "doc.pdf").write_bytes(text_pdf(2))
    ids = lambda paths, **kw: [r.page_id for r in list_pages(paths, **kw)]  # noqa: E731
    assert ids(["scans"]) == ["scans/a.png", "scans/b.png", "scans/doc.pdf#page=1", "scans/doc.pdf#page=2"]
    assert ids(["scans"], recursive=True) == ["scans/a.png", "scans/b.png", "scans/doc.pdf#page=1", "scans/doc.pdf#page=2",
                                              "scans/sub/c.png"]
    assert ids(["scans/*.png"]) == ["scans/a.png", "scans/b.png"]
    assert ids(["scans/**/*.png"]) == ["scans/a.png", "scans/b.png", "scans/sub/c.png"]
    # the same file named twice, by any spelling, or through its folder: read once, first name kept
    assert ids(["scans/a.png", "./scans/a.png", str(tmp_path / "scans" / "a.png")]) == ["scans/a.png"]
    assert ids(["scans/b.png", "scans"]) == ["scans/b.png", "scans/a.png", "scans/doc.pdf#page=1", "scans/doc.pdf#page=2"]
    # a file named explicitly is read whatever its suffix: its content decides
    Path("scan.dat").write_bytes((scans / "a.png").read_bytes())
    Path("report").write_bytes(text_pdf(1))
    assert ids(["scan.dat", "report"]) == ["scan.dat", "report#page=1"]
    with pytest.raises(FileNotFoundError, match="paths: no such file or folder: nope.png"):
        list_pages(["scans", "nope.png"])
    with pytest.raises(FileNotFoundError, match=r"paths: no file matches scans/\*.jpg"):
        list_pages(["scans/*.jpg"])


# ---- errors ---------------------------------------------------------------------------------------


def broken_pdfs(tmp_path) -> dict:
    """{file name: the error's cause} for every way a PDF fails."""
    full = text_pdf(3)
    files = {
        "locked.pdf": (text_pdf(2, password="s3cret"), "is password-protected: give its password with --password"),
        "no_pages.pdf": (make_pdf([(612, 792, ["x"])], kids=False), "has no pages"),
        "cut.pdf": (full[:len(full) // 2], f"is truncated at byte {len(full) // 2} (no %%EOF end marker)"),
        "download.pdf": (b"<!DOCTYPE html><html><body>Not found</body></html>",
                         "is not a PDF (it starts with b'<!DOCTYPE html><html'"),
        "zero_bytes.pdf": (b"", "is empty (0 bytes)"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: cause for name, (_, cause) in files.items()}


def test_pdf_errors_name_the_file_and_the_cause(tmp_path, pdfium):
    causes = broken_pdfs(tmp_path)
    for order in (list(causes), list(reversed(causes))):       # pdfium's last error must not travel between files
        for name in order:
            refs = list_pages([tmp_path / name])
            assert len(refs) == 1 and refs[0].page_id == str(tmp_path / name) and refs[0].error.startswith(causes[name])
            with pytest.raises(PageError) as e:
                load_image(refs[0])
            assert str(e.value).startswith(f"{tmp_path / name} {causes[name]}"), str(e.value)
            assert "PDFium" not in str(e.value) and "Success" not in str(e.value)
            if name != "locked.pdf":
                assert "password" not in str(e.value)


def test_password(tmp_path, pdfium):
    path = tmp_path / "locked.pdf"
    path.write_bytes(text_pdf(2, password="s3cret"))
    with pytest.raises(PageError, match="locked.pdf is password-protected and the password given does not open it"):
        P.pdf_page_count(path, "wrong")
    refs = list_pages([path], password="s3cret")
    assert [r.page_id for r in refs] == [f"{path}#page=1", f"{path}#page=2"]
    page = load_image(refs[1], password="s3cret")
    assert page.size == (1224, 1584) and rgb(page).min() < 40 and rgb(page).mean() > 200     # Letter at 144 dpi: text
    with pytest.raises(PageError, match="locked.pdf is password-protected: give its password"):
        load_image(refs[1])
    # an owner password alone (restricted permissions) opens for anyone, as in every viewer
    restricted = tmp_path / "restricted.pdf"
    restricted.write_bytes(make_pdf([(300, 400, ["printing not allowed"])], password="", owner="0wner"))
    assert b"/Encrypt" in restricted.read_bytes()
    assert rgb(load_image(f"{restricted}#page=1")).min() < 40


def test_image_errors_name_the_file_and_the_cause(tmp_path):
    page = text_page(300, 400).convert("RGB")
    page.save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    cut = len(data) * 2 // 3
    (tmp_path / "cut.jpg").write_bytes(data[:cut])
    page.save(tmp_path / "whole.png")
    png = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "header.png").write_bytes(png[:20])
    (tmp_path / "garbled.png").write_bytes(png[:8] + b"\x00" * 28)
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    want = {
        "cut.jpg": f"is truncated at byte {cut} (the file ends before the image does)",
        "cut.png": f"is truncated at byte {len(png) // 2} (the file ends before the image does)",
        "header.png": "is truncated at byte 20 (the file ends before the image does)",
        "garbled.png": "starts like a PNG file but PIL cannot read its header: damaged or truncated (36 bytes)",
        "notes.png": "is not an image or a PDF (PIL cannot identify it; it starts with b'this is not an image')",
        "empty.jpg": "is empty (0 bytes)",
    }
    try:
        import pillow_heif  # noqa: F401
    except ImportError:      # a phone's photo, without the plugin PIL needs for it
        want["phone.heic"] = "is a HEIF image (brand 'heic') this PIL cannot read: pip install pillow-heif"
    for name, cause in want.items():
        message = None
        for ref in list_pages([tmp_path / name]):      # listed (the header may pass) ... then read
            try:
                load_image(ref)
            except PageError as e:
                message = str(e)
        assert message.startswith(f"{tmp_path / name} {cause}"), message


def test_a_damaged_multi_page_file_keeps_its_good_pages(tmp_path):
    frames = [text_page(200, 260, seed=s) for s in range(3)]
    whole = tmp_path / "whole.tif"
    frames[0].save(whole, save_all=True, append_images=frames[1:])
    data = whole.read_bytes()
    # cut inside page 3's pixels (PIL writes each page's directory before its strips)
    with Image.open(whole) as im:
        im.seek(2)
        start = im.tile[0][2]
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:start + 100])
    refs = list_pages([cut])
    assert [r.page_id for r in refs] == [f"{cut}#page={n}" for n in (1, 2, 3)]
    for ref in refs[:2]:
        assert np.array_equal(rgb(load_image(ref)), rgb(frames[ref.index]))
    with pytest.raises(PageError, match=rf"cut.tif page 3 is truncated at byte {start + 100} "):
        load_image(refs[2])
    # cut inside page 2's directory: page 1 is listed, then where counting stopped, as a failed page
    with Image.open(whole) as im:
        im.seek(1)
        ifd = im._frame_pos[1]
    cut.write_bytes(data[:ifd + 30])
    refs = list_pages([cut])
    assert [r.page_id for r in refs] == [f"{cut}#page=1", f"{cut}#page=2"] and not refs[0].error
    assert refs[1].error and np.array_equal(rgb(load_image(refs[0])), rgb(frames[0]))
    with pytest.raises(PageError, match=rf"cut.tif page 2 "):
        load_image(refs[1])


def test_pixel_limit_names_the_file_and_the_option(tmp_path, pdfium):
    path = tmp_path / "big.png"
    text_page(400, 300).save(path)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(PageError, match=r"big.png is 400 x 300 = 120,000 pixels, over the limit of 100,000 .*--max-pixels N"):
        load_image(path, max_pixels=100_000)
    assert load_image(path, max_pixels=120_000).size == (400, 300)
    assert load_image(path, max_pixels=0).size == load_image(path, max_pixels=None).size == (400, 300)
    pdf = tmp_path / "poster.pdf"
    pdf.write_bytes(make_pdf([(7200, 7200, ["a 100-inch page"])]))
    with pytest.raises(PageError, match=r"poster.pdf page 1 is 14400 x 14400 = 207,360,000 pixels, over the limit of "
                                        r"178,956,970 .*--max-pixels"):
        load_image(pdf)       # no views to bound it: 144 dpi
    with pytest.raises(ValueError, match="max_pixels must be a non-negative int"):
        load_image(path, max_pixels=-1)
    assert Image.MAX_IMAGE_PIXELS == before          # PIL's own limit is put back
    # PIL's bomb check (on the declared size) is replaced, not doubled: a page PIL would refuse reads
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        assert load_image(path).size == (400, 300)
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_errors_pickle_with_their_fields():
    import pickle

    e = pickle.loads(pickle.dumps(PageError("x.pdf", "has no pages", 3)))
    assert (str(e), e.path, e.page, e.cause) == ("x.pdf page 3 has no pages", "x.pdf", 3, "has no pages")
    assert P.describe_error(e) == "x.pdf page 3 has no pages" and P.describe_error(KeyError("k")) == "KeyError: 'k'"


# ---- bounded work, exact views --------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_scan(tmp_path_factory):
    """A 9600 x 10400 scan (100 Mpx) as a JPEG, written once."""
    path = tmp_path_factory.mktemp("huge") / "scan.jpg"
    text_page(9600, 10400).save(path, quality=85)
    return path


def test_huge_pages_are_decoded_at_the_size_the_views_need(huge_scan, tmp_path, pdfium):
    # at full size the scan is 99.8 Mpx; JPEG's DCT scaling decodes it at 1/4 of a side for Tiny
    # (every view more than 3x smaller still; 1/8 would leave 2.3x), 1/2 for Base: a limit of
    # exactly that many pixels passes, one pixel less names the decoded size
    with pytest.raises(PageError, match="scan.jpg is 9600 x 10400 = 99,840,000 pixels, over the limit"):
        load_image(huge_scan, max_pixels=50_000_000)
    for mode, (w, h) in (("tiny", (2400, 2600)), ("base", (4800, 5200))):
        views = dk.preprocess(huge_scan, mode, max_pixels=w * h)
        assert views.global_view.shape[-1] == cfg.MODES[mode].base_size
        with pytest.raises(PageError, match=rf"scan.jpg is {w} x {h} = "):
            dk.preprocess(huge_scan, mode, max_pixels=w * h - 1)
    pdf = tmp_path / "poster.pdf"
    pdf.write_bytes(make_pdf([(7200, 7200, ["a 100-inch page"] * 40)]))
    # 14400 px at 144 dpi; rendered so every view is 4x smaller: 2048 px (Tiny), 4096 (Base)
    for mode, side in (("tiny", 2048), ("base", 4096)):
        dk.preprocess(pdf, mode, max_pixels=side * side)
        with pytest.raises(PageError, match=rf"poster.pdf page 1 is {side} x {side} = "):
            dk.preprocess(pdf, mode, max_pixels=side * side - 1)


def test_reduced_views_stay_close_to_upstreams(huge_scan):
    with Image.open(huge_scan) as im:
        full = im.convert("RGB")             # upstream: every pixel decoded, then PIL's resize
    for mode in ("tiny", "base"):
        got = dk.preprocess(huge_scan, mode).global_view
        want = upstream_views(full, mode)
        diff = ((got - want).abs() * 127.5).round()                         # in levels of 0..255
        assert diff.mean() < 0.5 and diff.max() <= 12, (mode, diff.mean(), diff.max())


@pytest.mark.parametrize("mode", ["tiny", "small", "base", "large", "gundam"])
def test_normal_pages_are_upstreams_bit_for_bit(tmp_path, mode):
    # Tiny/Small: the largest page still read whole (a view just under 6x smaller on one axis);
    # the others: an A4 page scanned at 300 dpi
    S = cfg.MODES[mode].base_size
    width, height = (6 * S - 8, 6 * S - 8) if mode in ("tiny", "small") else (2480, 3508)
    page = text_page(width, height, seed=1).convert("RGB")
    page.save(tmp_path / "page.jpg", quality=90)
    page.save(tmp_path / "page.png")
    for name in ("page.jpg", "page.png"):
        assert P.reduction((width, height), lambda w, h: PP.view_sizes(mode, w, h)) == 1
        with Image.open(tmp_path / name) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        got = dk.preprocess(tmp_path / name, mode)
        want = dk.preprocess(image, mode)              # a PIL image: taken as given, never reduced
        assert torch.equal(got.global_view, want.global_view), name
        assert (got.tiles is None) == (want.tiles is None) and (got.tiles is None or torch.equal(got.tiles, want.tiles))


def test_reduction_rule():
    tiny = lambda w, h: PP.view_sizes("tiny", w, h)  # noqa: E731
    assert P.reduction((3071, 3071), tiny) == 1                     # under 6x: read whole
    assert P.reduction((3072, 3072), tiny) == 2 and P.reduction((4608, 4608), tiny) == 3
    assert P.reduction((4608, 4609), tiny) == 3                     # 3 and 2 divide no side of 4609: the largest
    assert P.reduction((4610, 4608), tiny) == 2                     # 2 divides both: preferred to 3
    assert P.reduction((100_000, 100_000), tiny, choices=(8, 4, 2)) == 8
    assert P.reduction((100_000, 100_000), None) == 1
    # Gundam: a reduction that would change the tile grid is refused
    gundam = lambda w, h: PP.view_sizes("gundam", w, h)  # noqa: E731
    for size in ((14000, 13000), (12345, 6789), (40000, 5000)):
        k = P.reduction(size, gundam)
        assert gundam(-(-size[0] // k), -(-size[1] // k)) == gundam(*size), size


def test_a_gifs_pages_in_order_decode_each_frame_once(tmp_path, monkeypatch):
    """GIF frames are composed from the frames before them: a fresh open per page would decode
    frames 1..k for page k+1 (N^2 / 2 in all); the file of the last read is kept open instead."""
    from PIL import GifImagePlugin

    frames = [text_page(120, 160, seed=s) for s in range(8)]
    path = tmp_path / "eight.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    refs = list_pages([path])
    decoded = []
    real_seek = GifImagePlugin.GifImageFile._seek

    def counting_seek(self, frame, update_image=True):
        if update_image:
            decoded.append(frame)
        return real_seek(self, frame, update_image)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", counting_seek)
    pages = [load_image(ref) for ref in refs]
    assert all(np.array_equal(rgb(p), rgb(f)) for p, f in zip(pages, frames))
    assert [f for f in decoded if f] == list(range(1, len(frames))), decoded      # (frame 0: opening the file)
    assert np.array_equal(rgb(load_image(refs[2])), rgb(frames[2]))      # going back reopens the file
