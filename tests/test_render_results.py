"""benchmarks/render_results.py: the README's headline table and benchmarks/RESULTS.md come from the
result files (nothing typed), GPU rows say "not measured on a GPU yet" until a GPU run's file is
there, and the committed pages are what the committed results render to."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
render_results = importlib.util.module_from_spec(spec)
sys.modules["render_results"] = render_results
spec.loader.exec_module(render_results)


def render_copies(tmp_path, *results):
    md, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", md)
    shutil.copy(ROOT / "README.md", readme)
    render_results.render([ROOT / "benchmarks" / "results", *results], md, readme)
    return md.read_text(), readme.read_text()


def headline(text: str) -> list[str]:
    return text.split("<!-- headline:start")[1].split("<!-- headline:end")[0].splitlines()[1:]


def test_committed_pages_are_what_the_committed_results_render_to(tmp_path):
    md, readme = render_copies(tmp_path)
    assert md == (ROOT / "benchmarks" / "RESULTS.md").read_text(), \
        "benchmarks/RESULTS.md is stale: run python benchmarks/render_results.py and commit it"
    assert readme == (ROOT / "README.md").read_text(), \
        "README.md's headline table is stale: run python benchmarks/render_results.py and commit it"


def test_readme_is_short_and_links_the_results_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 15_000, f"README.md is {len(text.encode())} bytes: move detail to docs/guide.md or benchmarks/RESULTS.md"
    assert "(benchmarks/RESULTS.md)" in text and "(docs/guide.md)" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in text   # what .ci/run runs, last
    assert "### DeepEncoder V2" in text


def test_gpu_rows_wait_for_a_gpu_run_then_show_its_times(tmp_path):
    rows = headline(render_copies(tmp_path)[1])
    clip = next(r for r in rows if r.startswith("| CLIP attention"))
    assert render_results.NOT_YET in clip
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    result = dict(device="NVIDIA H200", date="2026-12-01", rows=[
        dict(kind="CLIP attention, one layer", impl="varlen (this package)", ms=0.5),
        dict(kind="CLIP attention, one layer", impl="padded SDPA + key mask", ms=2.0),
        dict(kind="encoder, mixed batch", impl="per-image loop", ms=300.0),
        dict(kind="encoder, mixed batch", impl="packed batch", ms=100.0)])
    (gpu / "packed_NVIDIA_H200.json").write_text(json.dumps(result))
    md, readme = render_copies(tmp_path, gpu)
    rows = headline(readme)
    clip = next(r for r in rows if r.startswith("| CLIP attention"))
    assert clip == ("| CLIP attention, varlen over the mixed batch's 42 sequences | 0.5 ms | "
                    "padded SDPA + key mask: 2 ms (4.00x) | NVIDIA H200, 2026-12-01 |")
    mixed = next(r for r in rows if r.startswith("| Mixed batch of 42 views"))
    assert "| 100 ms | per-image loop: 300 ms (3.00x) |" in mixed
    assert headline(md) == rows
    assert "**Packed attention and encoder on the GPU** (NVIDIA H200, 2026-12-01" in md


def test_headline_reads_each_gpu_benchmarks_own_format(tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    meta = dict(device="NVIDIA H200", date="2026-12-01")
    (gpu / "end_to_end_NVIDIA_H200.json").write_text(json.dumps(dict(meta, rows=[
        dict(model="v1", mode="base", impl="upstream's computation (reference)", ms=40.0),
        dict(model="v1", mode="base", impl="this package", ms=10.0),
        dict(model="v2", mode="dynamic", impl="upstream's computation (reference)", ms=90.0),
        dict(model="v2", mode="dynamic", impl="this package", ms=30.0)])))
    (gpu / "compress_timing_NVIDIA_H200.json").write_text(json.dumps(dict(meta, rows=[
        dict(mode="base", batch=1, impl="PyTorch NCHW", ms=0.3), dict(mode="base", batch=1, impl="fused (this package)", ms=0.1),
        dict(mode="base", batch=1, impl="fwd+bwd fused (this package)", ms=0.5), dict(mode="base", batch=32, impl="PyTorch NCHW", ms=9.0)])))
    bench = lambda impl, ms: dict(params=dict(mode="base", block="global", batch=1, impl=impl), stats=dict(median=ms / 1e3),  # noqa: E731
                                  extra_info=dict(device="NVIDIA H200"), name=f"test_rel_pos_attention[base-global-1-{impl}]")
    (gpu / "rel_pos_attention_NVIDIA_H200.json").write_text(json.dumps(dict(datetime="2026-12-01T10:00:00", benchmarks=[
        bench("fused", 0.25), bench("dense_sdpa", 1.0), bench("flex", 0.5)])))
    rows = headline(render_copies(tmp_path, gpu)[1])
    row = lambda start: next(r for r in rows if r.startswith("| " + start))  # noqa: E731
    assert row("DeepEncoder v1") == ("| DeepEncoder v1, one Base view, end to end (bf16) | 10 ms | "
                                     "upstream's computation (reference): 40 ms (4.00x) | NVIDIA H200, 2026-12-01 |")
    assert "| 30 ms | upstream's computation (reference): 90 ms (3.00x) |" in row("DeepEncoder V2")
    assert row("Neck + compressor, Base, batch 1") == ("| Neck + compressor, Base, batch 1 | 0.1 ms | PyTorch NCHW: 0.3 ms (3.00x) | "
                                                       "NVIDIA H200, 2026-12-01 |")
    assert row("SAM attention, Base, global") == ("| SAM attention, Base, global block, batch 1 | 0.25 ms | dense-bias SDPA (upstream): "
                                                  "1 ms (4.00x); FlexAttention: 0.5 ms (2.00x) | NVIDIA H200, 2026-12-01 |")
    assert render_results.NOT_YET in row("SAM attention, Base, windowed")


def test_unpack_puts_a_gpu_runs_results_back_one_file_each(tmp_path):
    all_json = tmp_path / "all_NVIDIA_H200.json"
    all_json.write_text(json.dumps({"packed_NVIDIA_H200": {"rows": []}, "tuned_NVIDIA_H200": {"entries": {}}}))
    written = render_results.unpack(all_json, tmp_path / "results")
    assert sorted(p.name for p in written) == ["packed_NVIDIA_H200.json", "tuned_NVIDIA_H200.json"]
    assert json.loads((tmp_path / "results" / "packed_NVIDIA_H200.json").read_text()) == {"rows": []}
    all_json.write_text(json.dumps({"../escape": {}}))
    with pytest.raises(SystemExit, match="is not a result file name"):
        render_results.unpack(all_json, tmp_path / "results")


def test_a_page_without_the_generated_block_is_a_clear_error(tmp_path):
    page = tmp_path / "README.md"
    page.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no <!-- headline:start --> .* block to rewrite"):
        render_results.render([ROOT / "benchmarks" / "results"], tmp_path / "RESULTS.md", page)
