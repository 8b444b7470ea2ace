"""encode: pages streamed in packed batches, tokens per page id, bounded memory, PDFs via pypdfium2."""
import gc
import json
import weakref

import pytest
import torch
from PIL import Image

from deepencoder_kernels import encode as E
from deepencoder_kernels.preprocess import render_document_page
from conftest import small_encoder


def _images(tmp_path, n=3):
    paths = []
    for i, size in enumerate([(900, 700), (700, 1300), (1400, 800), (640, 640)][:n]):
        img = Image.effect_mandelbrot(size, (-2.0 + 0.3 * i, -1.2, 1.0, 1.2), 60).convert("RGB")
        paths.append(tmp_path / f"page{i}.png")
        img.save(paths[-1])
    return paths


@pytest.mark.parametrize("mode,batch", [("tiny", 2), ("gundam", 3)])
def test_encode_files_equals_encode_per_page(tmp_path, mode, batch):
    enc = small_encoder()
    paths = _images(tmp_path)
    out = tmp_path / "tokens.safetensors"
    summary = E.encode_files(enc, paths, out, mode, batch=batch, progress=False)
    tokens, meta = E.load_tokens(out)
    assert list(tokens) == [str(p) for p in paths] and meta["mode"] == mode and meta["dim"] == "24"
    assert summary["pages"] == 3 and summary["tokens"] == sum(t.shape[0] for t in tokens.values())
    for p in paths:
        torch.testing.assert_close(tokens[str(p)], enc.encode(p, mode)[0], atol=2e-5, rtol=2e-5)
    # the file is plain safetensors
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == {str(p) for p in paths}


def test_pages_are_read_lazily_and_at_most_batch_are_held(monkeypatch):
    enc = small_encoder()
    produced, alive, seen = [], [], []
    real_preprocess = E.preprocess_page

    def pages():
        for i in range(5):
            produced.append(i)
            yield f"p{i}", render_document_page(320 + 64 * i, 480, seed=i)

    def tracking_preprocess(page, mode, max_crops, model, **read):
        views = real_preprocess(page, mode, max_crops, model, **read)
        alive.append(weakref.ref(views))
        return views

    def tracking_batch(encoder, views):
        gc.collect()
        seen.append((len(produced), len(views), sum(r() is not None for r in alive)))
        return [encoder.encode_views(v) for v in views]

    monkeypatch.setattr(E, "preprocess_page", tracking_preprocess)
    monkeypatch.setattr(E, "encode_views_batch", tracking_batch)
    out = list(E.encode_pages(enc, pages(), "tiny", batch=2))
    assert [i for i, _ in out] == [f"p{i}" for i in range(5)]
    # batch k was encoded when exactly the pages up to it had been produced, and no views of
    # earlier batches were alive
    assert seen == [(2, 2, 2), (4, 2, 2), (5, 1, 1)]


def test_encode_pages_uses_one_packed_pass_per_batch(monkeypatch):
    enc = small_encoder()
    calls = []
    original = enc.encode_views_packed
    monkeypatch.setattr(enc, "encode_views_packed", lambda views: calls.append(len(views)) or original(views))
    pages = [(i, render_document_page(400, 500, seed=i)) for i in range(5)]
    out = dict(E.encode_pages(enc, iter(pages), "tiny", batch=2))
    assert calls == [2, 2, 1] and sorted(out) == list(range(5))
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        list(E.encode_pages(enc, iter(pages), "tiny", batch=0))


def _pdf(tmp_path, n=3):
    imgs = [render_document_page(400, 560, seed=i) for i in range(n)]
    path = tmp_path / "doc.pdf"
    imgs[0].save(path, save_all=True, append_images=imgs[1:])
    return path


def test_pdf_pages_rendered_and_encoded(tmp_path):
    pytest.importorskip("pypdfium2", reason="the 'pdf' extra (pypdfium2) is in the test extra")
    enc = small_encoder()
    pdf = _pdf(tmp_path)
    image = _images(tmp_path, 1)[0]
    refs = E.list_pages([pdf, image])
    assert [r.page_id for r in refs] == [f"{pdf}#page=1", f"{pdf}#page=2", f"{pdf}#page=3", str(image)]
    out = tmp_path / "t.safetensors"
    E.encode_files(enc, [pdf, image], out, "small", batch=3, progress=False)
    tokens, meta = E.load_tokens(out)
    assert json.loads(meta["page_ids"]) == [r.page_id for r in refs]
    for k in range(3):
        page = E.render_pdf_page(pdf, k)
        assert page.size == (800, 1120)          # 400 x 560 pt at 144 dpi
        torch.testing.assert_close(tokens[f"{pdf}#page={k + 1}"], enc.encode(page, "small")[0], atol=2e-5, rtol=2e-5)


def test_pdf_without_pypdfium2_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pdfium(name, *args, **kwargs):
        if name == "pypdfium2":
            raise ImportError("No module named 'pypdfium2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pdfium)
    (tmp_path / "a.pdf").write_bytes(b"%PDF-1.4\n")
    with pytest.raises(ImportError, match=r"pip install 'deepencoder-kernels\[pdf\]'"):
        E.list_pages([tmp_path / "a.pdf"])


def test_pdf_through_a_fake_renderer(tmp_path):
    """The PDF path without pypdfium2: page count and renderer injected, pages rendered on demand."""
    enc = small_encoder()
    rendered = []

    def render(path, index):
        rendered.append(index)
        return render_document_page(300 + 100 * index, 400, seed=index)

    (tmp_path / "x.pdf").write_bytes(b"%PDF-1.4\n")
    out = tmp_path / "x.safetensors"
    E.encode_files(enc, [tmp_path / "x.pdf"], out, "tiny", batch=2, progress=False, render=render, page_count=lambda p: 4)
    tokens, _ = E.load_tokens(out)
    assert rendered == [0, 1, 2, 3] and len(tokens) == 4
    torch.testing.assert_close(tokens[f"{tmp_path / 'x.pdf'}#page=3"], enc.encode(render(tmp_path / "x.pdf", 2), "tiny")[0],
                               atol=2e-5, rtol=2e-5)


def test_bad_inputs(tmp_path):
    enc = small_encoder()
    with pytest.raises(FileNotFoundError, match="paths: no such file"):
        E.list_pages([tmp_path / "nope.png"])
    (tmp_path / "a.txt").write_text("x")          # named explicitly: read, and failing as a page
    assert [(r.page_id, r.error) for r in E.list_pages([tmp_path / "a.txt"])] == [
        (str(tmp_path / "a.txt"), "is not an image or a PDF (PIL cannot identify it; it starts with b'x')")]
    with pytest.raises(ValueError, match="mode must be one of"):
        list(E.encode_pages(enc, iter([]), "huge"))
    with pytest.raises(ValueError, match="alpha must be one of"):
        list(E.encode_pages(enc, iter([]), "tiny", alpha="grey"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="paths: no pages to encode"):
        E.encode_files(enc, [tmp_path / "empty"], tmp_path / "o.safetensors", progress=False)


def test_token_writer_is_valid_safetensors(tmp_path):
    from safetensors.torch import load_file

    w = E.TokenWriter(tmp_path / "w.safetensors")
    a, b = torch.randn(3, 5).to(torch.bfloat16), torch.randn(0, 5)
    w.add("a", a)
    w.add("b", b)
    w.add("c", torch.arange(6, dtype=torch.float16).view(2, 3))
    w.close({"mode": "base"})
    got = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(got["a"], a) and got["b"].shape == (0, 5) and got["c"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]     # no temporary file left


def test_cli_encode(tmp_path, capsys):
    from deepencoder_kernels import cli

    paths = _images(tmp_path, 2)
    enc = small_encoder()
    original = __import__("deepencoder_kernels.profiler", fromlist=["random_encoder"]).random_encoder
    import deepencoder_kernels.profiler as prof

    prof.random_encoder = lambda dtype=torch.float32, device="cpu", seed=0, model=None: enc.to(dtype)
    try:
        assert cli.main(["encode", *map(str, paths), "--mode", "tiny", "--out", str(tmp_path / "o.safetensors"),
                         "--batch", "2", "--dtype", "float32", "--quiet"]) == 0
    finally:
        prof.random_encoder = original
    assert "2 pages" in capsys.readouterr().out
    tokens, meta = E.load_tokens(tmp_path / "o.safetensors")
    assert meta["mode"] == "tiny" and all(t.shape == (73, 24) for t in tokens.values())


def test_progress_bar_goes_to_its_stream():
    import io

    stream = io.StringIO()
    bar = E.Progress(3, stream=stream, every=3600)
    bar.update()
    bar.update()
    assert stream.getvalue() == ""                  # not a terminal: throttled ...
    bar.update()
    bar.close()
    assert "3/3 pages" in stream.getvalue() and "|" + "#" * 30 + "|" in stream.getvalue()   # ... but the end is always shown


# ---- isolation: one bad page never costs the others ----------------------------------------------


def _mixed_folder(folder):
    """Good pages and broken files, named so that their order interleaves."""
    from synthetic_pages import make_pdf, text_page, text_pdf

    folder.mkdir()
    text_page(300, 380, seed=1).save(folder / "a.png")
    (folder / "b_locked.pdf").write_bytes(text_pdf(2, width=200, height=260, password="s3cret"))
    frames = [text_page(260, 340, seed=s) for s in range(3)]
    frames[0].save(folder / "c.tif", save_all=True, append_images=frames[1:])
    text_page(320, 400, seed=4).convert("RGB").save(folder / "d_cut.jpg", quality=90)
    data = (folder / "d_cut.jpg").read_bytes()
    (folder / "d_cut.jpg").write_bytes(data[:len(data) // 2])
    (folder / "e.pdf").write_bytes(text_pdf(2, width=200, height=260))
    (folder / "f_empty.pdf").write_bytes(make_pdf([(200, 260, ["x"])], kids=False))
    text_page(280, 300, seed=6).save(folder / "g.png")
    f = str(folder)
    good = [f"{f}/a.png", f"{f}/c.tif#page=1", f"{f}/c.tif#page=2", f"{f}/c.tif#page=3", f"{f}/e.pdf#page=1",
            f"{f}/e.pdf#page=2", f"{f}/g.png"]
    failed = {f"{f}/b_locked.pdf": f"{f}/b_locked.pdf is password-protected: give its password with --password",
              f"{f}/d_cut.jpg": f"{f}/d_cut.jpg is truncated at byte {len(data) // 2}",
              f"{f}/f_empty.pdf": f"{f}/f_empty.pdf has no pages"}
    return good, failed


def test_one_bad_page_never_costs_the_others(tmp_path):
    import io

    enc = small_encoder()
    good, failed = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out" / "tokens.safetensors"
    stream = io.StringIO()
    summary = E.encode_files(enc, [tmp_path / "in"], out, "tiny", batch=3, progress=False, stream=stream)
    tokens, meta = E.load_tokens(out)
    assert list(tokens) == good == json.loads(meta["page_ids"])
    assert json.loads(meta["failed_page_ids"]) == list(failed) == [page_id for page_id, _ in summary["failed"]]
    assert (summary["pages"], summary["encoded"]) == (10, 7)
    for (page_id, error), want in zip(summary["failed"], failed.values()):
        assert error.startswith(want), error
    lines = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert lines == [{"page_id": p, "error": e} for p, e in summary["failed"]] and summary["errors"] == str(tmp_path / "out" / "errors.jsonl")
    assert stream.getvalue().splitlines() == [f"page {p} failed: {e}" for p, e in summary["failed"]]
    for page_id in (good[2], good[5]):          # a TIFF frame, a PDF page: the tokens of that page alone
        torch.testing.assert_close(tokens[page_id], enc.encode(page_id, "tiny")[0], atol=2e-5, rtol=2e-5)
    # a clean run rewrites errors.jsonl empty
    E.encode_files(enc, [tmp_path / "in" / "a.png"], out, "tiny", progress=False, stream=stream)
    assert (tmp_path / "out" / "errors.jsonl").read_text() == ""


def test_encode_pages_reports_each_failed_page(monkeypatch, tmp_path):
    from deepencoder_kernels.pages import PageError

    enc = small_encoder()
    good, failed = _mixed_folder(tmp_path / "in")
    refs = E.list_pages([tmp_path / "in"])
    # without on_error the first failure is raised, naming its file
    with pytest.raises(PageError, match="b_locked.pdf is password-protected"):
        list(E.encode_pages(enc, ((r.page_id, p) for r, p in E.iter_pages(refs)), "tiny", batch=4))
    # a batch the encoder fails on is re-encoded page by page: only the page at fault fails
    real = enc.encode_views_packed

    def fails_on_blank(views):
        if any(v.global_view.min() == v.global_view.max() for v in views):
            raise RuntimeError("encoder fault")
        return real(views)

    blank = Image.new("L", (300, 300), 255)
    monkeypatch.setattr(enc, "encode_views_packed", fails_on_blank)
    errors = []
    pages = [("ok1", render_document_page(300, 300, seed=1)), ("blank", blank), ("ok2", render_document_page(320, 300, seed=2))]
    out = list(E.encode_pages(enc, iter(pages), "tiny", batch=3, on_error=lambda i, e: errors.append((i, str(e)))))
    assert [i for i, _ in out] == ["ok1", "ok2"] and errors == [("blank", "encoder fault")]


def _cli(args, enc, monkeypatch, capsys):
    from deepencoder_kernels import cli
    import deepencoder_kernels.profiler as prof

    monkeypatch.setattr(prof, "random_encoder", lambda dtype=torch.float32, device="cpu", seed=0, model=None: enc.to(dtype))
    code = cli.main(["encode", *map(str, args), "--mode", "tiny", "--dtype", "float32", "--quiet"])
    return code, capsys.readouterr()


def test_cli_exit_status_says_whether_a_page_failed(tmp_path, monkeypatch, capsys):
    enc = small_encoder()
    good, failed = _mixed_folder(tmp_path / "in")
    code, io_ = _cli([tmp_path / "in", "--out", tmp_path / "o.safetensors"], enc, monkeypatch, capsys)
    assert code == 1 and f"7/10 pages" in io_.out and f"3 pages failed, listed in {tmp_path / 'errors.jsonl'}" in io_.out
    assert all(message in io_.err for message in failed.values())
    assert list(E.load_tokens(tmp_path / "o.safetensors")[0]) == good
    # the password opens the locked PDF; the file named twice is read once
    monkeypatch.chdir(tmp_path)
    code, io_ = _cli(["in/b_locked.pdf", "in/a.png", "./in/a.png", "--password", "s3cret", "--out", "p.safetensors"],
                     enc, monkeypatch, capsys)
    assert code == 0 and "3/3 pages" in io_.out
    assert list(E.load_tokens(tmp_path / "p.safetensors")[0]) == ["in/b_locked.pdf#page=1", "in/b_locked.pdf#page=2", "in/a.png"]
    code, io_ = _cli(["in/nope.png", "--out", "q.safetensors"], enc, monkeypatch, capsys)
    assert code == 2 and "error: paths: no such file or folder: in/nope.png" in io_.err and not (tmp_path / "q.safetensors").exists()


def test_encode_files_v2_dynamic_pages(tmp_path):
    """DeepEncoder V2 through the same page pipeline: dynamic tiles of 768 + the 1024 view (257 + 144 k
    tokens per page), equal to ``enc.encode`` page by page, the model recorded in the file."""
    from conftest import small_encoder_v2

    enc = small_encoder_v2()
    paths = []
    for i, size in enumerate([(700, 500), (1536, 768)]):
        paths.append(tmp_path / f"v2-{i}.png")
        Image.effect_mandelbrot(size, (-2.0 + 0.3 * i, -1.2, 1.0, 1.2), 60).convert("RGB").save(paths[-1])
    out = tmp_path / "v2.safetensors"
    summary = E.encode_files(enc, paths, out, "dynamic", batch=2, progress=False)
    tokens, meta = E.load_tokens(out)
    assert meta["model"] == "v2" and meta["mode"] == "dynamic" and meta["max_crops"] == "6"
    assert [t.shape[0] for t in tokens.values()] == [257, 545] and summary["encoded"] == 2
    for p in paths:
        torch.testing.assert_close(tokens[str(p)], enc.encode(p, "dynamic")[0], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"mode must be one of \['base', 'dynamic'\] for model v2, got 'gundam'"):
        E.encode_files(enc, paths, tmp_path / "x.safetensors", "gundam", progress=False)


def test_cli_encode_v2(tmp_path, capsys):
    from deepencoder_kernels import cli
    import deepencoder_kernels.profiler as prof
    from conftest import small_encoder_v2

    paths = _images(tmp_path, 1)
    enc, original, asked = small_encoder_v2(), prof.random_encoder, []
    prof.random_encoder = lambda dtype=torch.float32, device="cpu", seed=0, model=None: asked.append(model) or enc.to(dtype)
    try:
        assert cli.main(["encode", str(paths[0]), "--model", "v2", "--out", str(tmp_path / "o.safetensors"),
                         "--dtype", "float32", "--quiet"]) == 0
    finally:
        prof.random_encoder = original
    assert asked == ["v2"] and "(v2 dynamic, float32)" in capsys.readouterr().out
    tokens, meta = E.load_tokens(tmp_path / "o.safetensors")
    assert meta["model"] == "v2" and [t.shape for t in tokens.values()] == [(1121, 24)]   # 900 x 700 (1.29): 3 x 2 tiles
    with pytest.raises(SystemExit):
        cli.main(["encode", str(paths[0]), "--model", "v2", "--mode", "tiny", "--out", str(tmp_path / "x.safetensors")])
