"""deepencoder_kernels.ray: the Ray Data pipeline on a local Ray cluster (2 CPUs), with the narrow
test encoder. Tokens equal the plain encode page by page; a failing page (unreadable, or failing
inside the encoder) is reported with its id while the rest go on; a worker killed mid-run loses and
duplicates nothing (Ray restarts the actor and retries its batch)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

import deepencoder_kernels as dk
from conftest import assert_close, small_encoder
from deepencoder_kernels.preprocess import preprocess
from deepencoder_kernels import ray as dkray

HERE = Path(__file__).resolve().parent


def make_pages(folder: Path, n: int) -> dict[str, str]:
    """n small rendered pages (odd sizes) -> {page_id: mode}, alternating Tiny and Small."""
    folder.mkdir(parents=True, exist_ok=True)
    modes = {}
    for i in range(n):
        dk.render_document_page(280 + 37 * i, 400 - 11 * i, seed=i).save(folder / f"page{i}.png")
        modes[f"page{i}.png"] = "tiny" if i % 2 else "small"
    return modes


class FailsOnBlankPages(nn.Module):
    """The test encoder, refusing pages whose global view is one flat colour (an encoder-side failure)."""

    def __init__(self):
        super().__init__()
        self.enc = small_encoder()

    @staticmethod
    def _check(views):
        if views.global_view.min() == views.global_view.max():
            raise ValueError("blank page")

    def encode_views(self, views):
        self._check(views)
        return self.enc.encode_views(views)

    def encode_views_packed(self, batch):
        for views in batch:
            self._check(views)
        return self.enc.encode_views_packed(batch)


class KillOnce(nn.Module):
    """The test encoder, whose process dies (os._exit) on its first batch unless ``marker`` exists."""

    def __init__(self, marker: str):
        super().__init__()
        self.enc, self.marker = small_encoder(), marker

    def encode_views_packed(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.enc.encode_views_packed(batch)

    def encode_views(self, views):
        return self.enc.encode_views(views)


class KillOnceFactory:
    def __init__(self, marker):
        self.marker = marker

    def __call__(self):
        return KillOnce(self.marker)


# ---- without Ray -----------------------------------------------------------------------------


def test_views_travel_as_uint8_bit_exactly(tmp_path):
    dk.render_document_page(900, 700, seed=3).save(tmp_path / "p.png")
    views = preprocess(str(tmp_path / "p.png"), "gundam")
    assert views.tiles is not None
    for pixels in (views.global_view, views.tiles):
        assert torch.equal(dkray._from_u8(dkray._to_u8(pixels)), pixels)


def test_list_pages_and_argument_errors(tmp_path):
    from deepencoder_kernels import encode as E

    make_pages(tmp_path / "a" / "sub", 2)
    make_pages(tmp_path / "a", 1)
    (tmp_path / "a" / "notes.txt").write_text("not a page")
    sub = tmp_path / "a" / "sub"
    top = [str(tmp_path / "a" / "page0.png")]
    assert [p["page_id"] for p in dkray.list_pages(tmp_path / "a")] == top                # folders: no subfolders ...
    pages = dkray.list_pages(tmp_path / "a", recursive=True)                              # ... unless recursive
    assert [p["page_id"] for p in pages] == top + [str(sub / "page0.png"), str(sub / "page1.png")]   # encode's ids: the paths
    assert all(p["index"] == -1 and p["kind"] == "image" and not p["error"] for p in pages)
    # the same listing as encode's, for every kind of source; a file named twice is listed once
    for source in ([tmp_path / "a"], [str(sub / "*.png"), sub / "page1.png"], [sub / "page0.png"] * 2):
        assert [p["page_id"] for p in dkray.list_pages(source)] == [r.page_id for r in E.list_pages(source)]
    assert len(dkray.list_pages([sub / "page0.png"] * 2)) == 1
    with pytest.raises(FileNotFoundError, match="source: no such file"):
        dkray.list_pages(tmp_path / "missing")
    with pytest.raises(ValueError, match="fmt must be"):
        dkray.encode_collection(tmp_path / "a", tmp_path / "out", fmt="npz")
    with pytest.raises(ValueError, match="mode must be one of"):
        dkray.encode_collection(tmp_path / "a", tmp_path / "out", mode="huge")
    with pytest.raises(ValueError, match="alpha must be one of"):
        dkray.encode_collection(tmp_path / "a", tmp_path / "out", alpha="grey")


def test_pdf_pages_are_listed_read_and_preprocessed(tmp_path):
    pytest.importorskip("pypdfium2", reason="PDF pages need pypdfium2 (pip install pypdfium2)")
    from deepencoder_kernels.preprocess import load_image

    pages = [dk.render_document_page(300, 420, seed=s) for s in (1, 2)]
    pages[0].save(tmp_path / "doc.pdf", save_all=True, append_images=pages[1:], resolution=72)
    items = dkray.list_pages(tmp_path)
    pdf = str(tmp_path / "doc.pdf")
    assert [p["page_id"] for p in items] == [f"{pdf}#page=1", f"{pdf}#page=2"] and [p["index"] for p in items] == [0, 1]
    rendered = load_image(dkray.read_page(**{k: items[1][k] for k in ("path", "index", "kind", "frame", "error")}))
    assert rendered.size == (300 * dkray.PDF_DPI // 72, 420 * dkray.PDF_DPI // 72)
    batch = {k: [p[k] for p in items] for k in ("page_id", "path", "index")} | {"mode": ["tiny", "tiny"]}
    out = dkray.preprocess_batch(batch)
    assert list(out["error"]) == ["", ""] and out["global_view"].shape == (2, 3, 512, 512)
    assert torch.equal(dkray._from_u8(out["global_view"][1]), preprocess(rendered, "tiny").global_view)


def test_preprocess_batch_reads_frames_and_reports_page_errors(tmp_path):
    pytest.importorskip("pypdfium2", reason="PDF pages need pypdfium2 (pip install pypdfium2)")
    from synthetic_pages import text_page, text_pdf

    frames = [text_page(200, 260, seed=s) for s in range(2)]
    frames[0].save(tmp_path / "two.tif", save_all=True, append_images=frames[1:])
    (tmp_path / "locked.pdf").write_bytes(text_pdf(1, password="s3cret"))
    items = dkray.list_pages(tmp_path)
    assert [p["page_id"] for p in items] == [str(tmp_path / "locked.pdf"), f"{tmp_path / 'two.tif'}#page=1",
                                             f"{tmp_path / 'two.tif'}#page=2"]
    batch = {k: [p[k] for p in items] for k in items[0]} | {"mode": ["tiny"] * 3}
    out = dkray.preprocess_batch(batch)
    assert out["error"][0] == f"{tmp_path / 'locked.pdf'} is password-protected: give its password with --password (password= in Python)"
    assert list(out["error"][1:]) == ["", ""]
    assert torch.equal(dkray._from_u8(out["global_view"][2]), preprocess(frames[1], "tiny").global_view)
    out = dkray.preprocess_batch(batch | {"error": ["", "", ""]}, password="s3cret")   # listed with the password
    assert list(out["error"]) == ["", "", ""]


@pytest.mark.parametrize("fmt", ["safetensors", "parquet"])
def test_shards_hold_shard_pages_each_and_read_back(tmp_path, fmt):
    pages = {f"p{i}.png": torch.randn(3 + i, 8).to(torch.bfloat16) for i in range(5)}
    writer = dkray._ShardWriter(tmp_path, fmt, shard_pages=2)
    for page_id, tokens in pages.items():
        writer.add(page_id, "tiny", tokens)
    writer.flush()
    assert [Path(f).name for f in writer.files] == [f"tokens-0000{i}.{fmt}" for i in range(3)]
    got = dkray.read_tokens(tmp_path)
    assert list(got) == list(pages) and all(torch.equal(got[k], v) for k, v in pages.items())
    if fmt == "safetensors":
        from deepencoder_kernels.encode import load_tokens

        assert load_tokens(writer.files[0])[1]["modes"] == '{"p0.png": "tiny", "p1.png": "tiny"}'
        writer.add("p9.png", "tiny", pages["p0.png"])
        writer.abort()                                   # a half-written shard leaves nothing behind
        assert sorted(p.name for p in tmp_path.iterdir()) == [Path(f).name for f in writer.files]


def test_command_line_passes_the_options_through(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(source, out, mode, weights, **kw):
        seen.update(source=source, out=out, mode=mode, weights=weights, **kw)
        return dkray.Summary(pages=3, encoded=2, failed=[("x.png", "ValueError: bad")])

    monkeypatch.setattr(dkray, "encode_collection", fake)
    code = dkray.main(["a/", "b.png", "--out", str(tmp_path), "--mode", "gundam", "--format", "parquet",
                       "--batch", "4", "--concurrency", "2", "--num-gpus", "0.5", "--max-crops", "6",
                       "--object-store-mib", "512", "--backend", "reference", "--quiet"])
    assert code == 1 and "2/3 pages encoded, 1 failed" in capsys.readouterr().out
    assert seen == dict(source=["a/", "b.png"], out=str(tmp_path), mode="gundam", weights=None, fmt="parquet",
                        shard_pages=256, batch_size=4, concurrency=2, num_gpus=0.5, device=None, dtype="auto",
                        backend="reference", max_crops=6, ray_address=None, progress=False,
                        object_store_limit=512 * 2**20, recursive=False, password=None, alpha="white",
                        max_pixels=dkray.MAX_PIXELS, model="v1")


def test_encode_verb_with_ray_runs_the_pipeline_with_its_arguments(monkeypatch, tmp_path, capsys):
    from deepencoder_kernels import cli

    seen = {}
    monkeypatch.setattr(dkray, "encode_collection",
                        lambda source, out, mode, weights, **kw: seen.update(source=source, mode=mode, **kw) or dkray.Summary(pages=1, encoded=1))
    assert cli.main(["encode", "a.png", "doc.pdf", "--out", str(tmp_path), "--mode", "tiny", "--ray", "--batch", "3",
                     "--concurrency", "2", "--ray-address", "ray://head:10001", "--format", "parquet", "--recursive",
                     "--password", "pw", "--alpha", "drop", "--max-pixels", "0"]) == 0
    assert seen["source"] == ["a.png", "doc.pdf"] and seen["mode"] == "tiny" and seen["batch_size"] == 3
    # --max-crops unset: None, the mode's own budget (encode's default since --model)
    assert (seen["concurrency"], seen["ray_address"], seen["fmt"], seen["max_crops"]) == (2, "ray://head:10001", "parquet", None)
    assert (seen["recursive"], seen["password"], seen["alpha"], seen["max_pixels"]) == (True, "pw", "drop", 0)
    assert "1/1 pages encoded" in capsys.readouterr().out


# ---- on a local Ray cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (or '.[test]') to run these")
    # workers import this file's encoders (and conftest's) by module name
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}})
    yield ray
    ray.shutdown()


def test_tokens_equal_plain_encode_and_failures_are_reported(local_ray, tmp_path):
    modes = make_pages(tmp_path / "pages", 4)
    (tmp_path / "pages" / "broken.png").write_text("not an image")                      # fails in preprocessing
    Image.new("RGB", (300, 300), "white").save(tmp_path / "pages" / "blank.png")      # fails in the encoder
    dk.render_document_page(1000, 700, seed=9).save(tmp_path / "pages" / "wide.png")      # Gundam: 2 x 1 tiles
    frames = [dk.render_document_page(300, 380, seed=s) for s in (10, 11)]
    frames[0].save(tmp_path / "pages" / "two.tif", save_all=True, append_images=frames[1:])   # a page per frame
    from synthetic_pages import text_pdf

    (tmp_path / "pages" / "locked.pdf").write_bytes(text_pdf(1, password="s3cret"))   # fails when listed
    modes.update({"broken.png": "tiny", "blank.png": "small", "wide.png": "gundam", "two.tif": "tiny", "locked.pdf": "tiny"})
    lines = []
    summary = dkray.encode_collection(tmp_path / "pages", tmp_path / "out", mode=lambda page_id: modes[Path(page_id.split("#")[0]).name],
                                      encoder_factory=FailsOnBlankPages, batch_size=3, concurrency=1, progress=lines.append,
                                      dtype="float32",
                                      object_store_limit=256 * 2**20)
    assert summary.pages == 10 and summary.encoded == 7 and summary.duplicates == 0, summary
    failed = {Path(page_id).name: error for page_id, error in summary.failed}
    assert set(failed) == {"broken.png", "blank.png", "locked.pdf"}
    assert failed["broken.png"].startswith(f"{tmp_path / 'pages' / 'broken.png'} is not an image or a PDF")
    assert failed["blank.png"] == "ValueError: blank page"
    assert failed["locked.pdf"].startswith(f"{tmp_path / 'pages' / 'locked.pdf'} is password-protected")
    assert (tmp_path / "out" / "errors.jsonl").read_text().count("page_id") == 3
    assert any("10/10 pages (3 failed)" in line for line in lines), lines
    assert any(line.startswith(f"page {tmp_path / 'pages' / 'locked.pdf'} failed: ") for line in lines), lines
    got = dkray.read_tokens(tmp_path / "out")
    tif = tmp_path / "pages" / "two.tif"
    assert sorted(got) == sorted([str(tmp_path / "pages" / f"page{i}.png") for i in range(4)] + [str(tmp_path / "pages" / "wide.png"),
                                                                                                 f"{tif}#page=1", f"{tif}#page=2"])
    from deepencoder_kernels.preprocess import choose_tile_grid

    assert got[str(tmp_path / "pages" / "wide.png")].shape[0] == dk.token_count("gundam", choose_tile_grid(1000, 700)) > 273
    enc = small_encoder()
    for page_id, tokens in got.items():
        want = enc.encode(page_id, modes[Path(page_id.split("#")[0]).name])[0]
        assert tokens.shape == want.shape and tokens.dtype == torch.float32, page_id
        assert_close(tokens, want, torch.float32, msg=page_id)


def test_killed_worker_loses_and_duplicates_nothing(local_ray, tmp_path):
    modes = make_pages(tmp_path / "pages", 6)
    marker = tmp_path / "killed"
    summary = dkray.encode_collection(tmp_path / "pages", tmp_path / "out", mode=lambda p: modes[Path(p).name], fmt="parquet",
                                      shard_pages=4, encoder_factory=KillOnceFactory(str(marker)), batch_size=2, dtype="float32",
                                      concurrency=1, progress=False)
    assert marker.exists(), "the encoder process was never killed"
    assert (summary.encoded, summary.failed, summary.duplicates) == (6, [], 0), summary
    assert len(summary.files) == 2 and all(f.endswith(".parquet") for f in summary.files)
    got = dkray.read_tokens(tmp_path / "out")
    assert sorted(got) == sorted(str(tmp_path / "pages" / name) for name in modes)
    enc = small_encoder()
    for name in ("page0.png", "page5.png"):
        page_id = str(tmp_path / "pages" / name)
        assert_close(got[page_id], enc.encode(page_id, modes[name])[0], torch.float32)


def test_v2_pages_through_the_pipeline_steps(tmp_path):
    """DeepEncoder V2 on the pipeline's steps without a cluster: the preprocessing task makes V2's
    views (768 tiles, 1024 global), the actor (an EncoderSpec of model v2) encodes them packed, equal
    to ``enc.encode``."""
    from conftest import small_encoder_v2
    from synthetic_pages import text_page

    page = text_page(1536, 768, seed=3)
    page.save(tmp_path / "wide.png")
    items = dkray.list_pages(tmp_path)
    batch = {k: [p[k] for p in items] for k in items[0]} | {"mode": ["dynamic"]}
    views = dkray.preprocess_batch(batch, model="v2")
    assert views["error"][0] == "" and dkray._from_u8(views["tiles"][0]).shape == (2, 3, 768, 768)
    enc = small_encoder_v2()
    actor = dkray.EncodeActor(dkray.EncoderSpec(factory=lambda: enc, model="v2"), device="cpu", dtype="float32")
    row = {k: v[0] for k, v in actor(views).items()}
    assert row["error"] == "" and row["n_tokens"] == 545
    torch.testing.assert_close(dkray.tokens_of(row), enc.encode(tmp_path / "wide.png", "dynamic")[0], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="for model v2, got 'gundam' \\(page "):
        dkray.encode_collection(tmp_path, tmp_path / "out", "gundam", model="v2")
