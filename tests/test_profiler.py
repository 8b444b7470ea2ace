"""The profiler: FLOPs at the real shapes (counted on the meta device), tracked bytes, report."""
import json

import pytest
import torch

import deepencoder_kernels as dk

from deepencoder_kernels import profiler
from deepencoder_kernels.modules import DeepEncoder
from conftest import small_encoder

G = 1e9


def meta_profile(mode):
    with torch.device("meta"):
        enc = DeepEncoder().to(torch.bfloat16)
    return profiler.profile(mode, encoder=enc, device="meta", progress=False)


def test_base_flops_match_the_architecture():
    """Reference doc section 7: patch 4.8, windowed 519.5 (incl. 30.3 of window padding upstream
    runs through qkv/proj), global 441.3, neck 11.3, CLIP 161.7, projector 1.3, total ~1140."""
    p = meta_profile("base")
    f = {s.name: s.flops / G for s in p.stages}
    pad = profiler.window_padding_flops(1024) / G
    assert f["patch embed"] == pytest.approx(4.8, abs=0.05)
    assert f["windowed blocks"] + pad == pytest.approx(519.5, abs=0.2)
    assert f["global blocks"] == pytest.approx(441.3, abs=0.1)
    assert f["neck+compressor"] == pytest.approx(11.3, abs=0.05)
    assert f["CLIP"] == pytest.approx(161.7, abs=0.1)
    assert f["projector"] == pytest.approx(1.3, abs=0.05)
    assert (p.sam_trunk_flops / G + pad) == pytest.approx(965.6, abs=0.3)
    assert (p.total_flops / G + pad) == pytest.approx(1140, abs=1)
    verdicts = {c["claim"]: c["verdict"] for c in p.claims}
    assert verdicts["SAM ~65 GFLOPs"].startswith("wrong by 14")
    assert verdicts["CLIP ~180 GFLOPs"] == "about right"
    assert verdicts["SAM uses 8x8 windows"].startswith("wrong")
    clip4096 = next(c for c in p.claims if c["claim"].startswith("CLIP on 4096"))
    assert clip4096["measured"] == pytest.approx(4125, rel=0.01)


@pytest.mark.parametrize("mode,total", [("tiny", 268), ("small", 388), ("large", 1943)])
def test_other_modes_flops(mode, total):
    p = meta_profile(mode)
    size = p.image_size
    assert (p.total_flops + profiler.window_padding_flops(size)) / G == pytest.approx(total, rel=0.01)


def test_memory_tracker_follows_storages():
    with profiler.MemoryTracker() as t:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        v = a.view(2, -1)            # a view is not an allocation
        b = torch.empty(3 << 20, dtype=torch.uint8)
        assert t.live == 4 << 20
        del b
        assert t.live == 1 << 20
        del a
        assert t.live == 1 << 20     # the view keeps the storage alive
        del v
    assert t.live == 0 and t.peak == 4 << 20 and t.total == 4 << 20 and t.largest == 3 << 20


def test_profile_small_encoder_report_json_plot(tmp_path):
    p = profiler.profile("tiny", encoder=small_encoder(), dtype=torch.float32, progress=False)
    assert p.output_tokens == 73 and p.backends["rel_pos_attention"] == "sdpa-blocked"
    glob = p.stage("global blocks")
    # one head of a 32 x 32 grid: the blocked backend's bias block is the whole [1, 1, 1024, 1024] bias
    assert glob.calls == 1 and glob.largest_tensor_bytes >= 1024 * 1024 * 4
    assert all(s.seconds > 0 and s.flops > 0 for s in p.stages)
    text = profiler.format_report(p)
    assert "windowed blocks" in text and "SAM uses 8x8 windows" in text
    profiler.save_json(p, tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["total_flops"] == p.total_flops and data["stages"][0]["name"] == "patch embed"
    profiler.plot(p, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_cli_profile_rejects_unknown_mode():
    from deepencoder_kernels.cli import main

    with pytest.raises(SystemExit):
        main(["profile", "--mode", "huge"])


def test_traffic_counter_counts_passes_not_views():
    from deepencoder_kernels.profiler import TrafficCounter

    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with TrafficCounter() as t:
        c = a + b                 # one pass: reads 2 x 128 B, writes 128 B
        c.t().reshape(-1)[:3]     # views only (reshape of a transpose copies: one more pass)
        torch.empty(100)          # an allocation moves nothing
    assert t.passes == 2
    assert t.bytes_read == 2 * 128 + 128 and t.bytes_written == 128 + 128


def _real_run_counts(enc, mode):
    """The old single pass, for reference: the encoder computing for real under the counters."""
    from torch.utils.flop_counter import FlopCounterMode

    from deepencoder_kernels.preprocess import preprocess, render_document_page

    views = preprocess(render_document_page(), mode)
    flops, tracker = FlopCounterMode(display=False), profiler.MemoryTracker()
    counter = profiler._Counter(flops, tracker)
    with torch.inference_mode(), flops, tracker:
        enc.encode_views(views, stage=counter)
    return {r.name: r for r in counter.records.values() if r.calls}


@pytest.mark.parametrize("mode", ["tiny", "gundam"])
def test_counting_pass_equals_a_real_run(mode):
    """Fake tensors count exactly what a computing run allocates and does, stage by stage."""
    enc = small_encoder()
    real = _real_run_counts(enc, mode)
    p = profiler.profile(mode, encoder=enc, dtype=torch.float32, device="cpu", repeat=0, progress=False)
    assert [s.name for s in p.stages] == list(real) and p.pass_seconds == [] and p.timing_dtype == ""
    for s in p.stages:
        r = real[s.name]
        assert (s.calls, s.flops, s.peak_bytes, s.allocated_bytes, s.largest_tensor_bytes) == \
            (r.calls, r.flops, r.peak_bytes, r.allocated_bytes, r.largest_tensor_bytes), s.name
    assert "times: not measured" in profiler.format_report(p)


def test_counting_pass_full_size_matches_the_checked_flops():
    """The CLI's counting pass (fake CPU tensors, bf16, full size) gives the FLOPs the meta test checks."""
    with torch.device("meta"):
        structure = DeepEncoder()
    meta = meta_profile("base")
    with dk.backend("reference"):   # upstream's computation: the dense bias
        p = profiler.profile("base", encoder=structure, device="cpu", repeat=0, progress=False)
    assert {s.name: s.flops for s in p.stages} == {s.name: s.flops for s in meta.stages}
    assert p.total_flops / G == pytest.approx(1109.6, abs=0.1)
    assert p.stage("global blocks").largest_tensor_bytes == 12 * 4096 * 4096 * 2   # the bf16 dense rel-pos bias
    # auto on a CPU: sdpa-blocked, the same FLOPs, the bias one block at a time (its size: threads, compute dtype)
    auto = profiler.profile("base", encoder=structure, device="cpu", repeat=0, progress=False)
    assert auto.backends["rel_pos_attention"] == "sdpa-blocked"
    assert {s.name: s.flops for s in auto.stages} == {s.name: s.flops for s in meta.stages}
    assert auto.stage("global blocks").largest_tensor_bytes < 12 * 4096 * 4096 * 2


def test_timing_passes_repeat_batch_and_views_per_second():
    enc = small_encoder()
    p = profiler.profile("tiny", image=None, encoder=enc, dtype=torch.float32, progress=False, repeat=3, warmup=1, batch=2)
    assert p.views == 1 and p.batch == 2 and len(p.pass_seconds) == 3 and p.first_pass_seconds > 0
    assert p.views_per_second == pytest.approx(2 / p.seconds)
    for s in p.stages:
        assert 0 < s.seconds_min <= s.seconds <= s.seconds_max
    one = profiler.profile("tiny", encoder=enc, dtype=torch.float32, progress=False, repeat=0)
    assert p.total_flops == 2 * one.total_flops and p.output_tokens == one.output_tokens
    text = profiler.format_report(p)
    assert "median (min..max) of 3 warm pass(es) after 1 warm-up" in text and "views/s" in text and "warm-up:" in text
    with pytest.raises(ValueError, match="repeat must be an integer >= 0"):
        profiler.profile("tiny", encoder=enc, repeat=-1, progress=False)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        profiler.profile("tiny", encoder=enc, batch=0, progress=False)


def dk_views(mode):
    from deepencoder_kernels.preprocess import preprocess, render_document_page

    return preprocess(render_document_page(), mode)


def test_batched_copies_equal_one_page():
    enc = small_encoder()
    views = dk_views("gundam")
    alone = enc.encode_views(views)
    copies = profiler.encode_copies(enc, views, 2)
    assert len(copies) == 2
    for tokens in copies:
        torch.testing.assert_close(tokens, alone, atol=2e-5, rtol=2e-5)


def test_emulated_bf16_is_timed_in_fp32_and_said(monkeypatch):
    rates = {torch.bfloat16: 1.0, torch.float32: 115.0}
    monkeypatch.setattr(profiler, "matmul_gflops", lambda dtype: rates[dtype])
    dtype, note, measured = profiler.choose_timing_dtype(torch.bfloat16, torch.device("cpu"))
    assert dtype == torch.float32 and "1.0 GFLOP/s vs 115.0" in note and measured == {"bfloat16": 1.0, "float32": 115.0}
    enc = small_encoder().to(torch.bfloat16)
    p = profiler.profile("tiny", encoder=enc, dtype=torch.bfloat16, progress=False, repeat=1)
    assert p.timing_dtype == "float32" and p.dtype == "bfloat16"
    assert enc.projector.layers.weight.dtype == torch.bfloat16             # the caller's encoder untouched
    counted = profiler.profile("tiny", encoder=enc, dtype=torch.bfloat16, progress=False, repeat=0)
    assert p.peak_bytes == counted.peak_bytes and p.total_flops == counted.total_flops   # bytes of bf16
    assert "note: timed in float32" in profiler.format_report(p)
    rates[torch.bfloat16] = 400.0                                          # native bf16 (AMX, a GPU-like CPU): kept
    assert profiler.choose_timing_dtype(torch.bfloat16, torch.device("cpu"))[0] == torch.bfloat16
    assert profiler.choose_timing_dtype(torch.bfloat16, torch.device("cuda"))[0] == torch.bfloat16


def test_matmul_probe_measures():
    assert profiler.matmul_gflops(torch.float32, 32, 64, 64) > 0


def test_cli_profile_counting_only(capsys, tmp_path):
    """`profile --repeat 0`: the full-size Base counts in about a second, no weights built, no times."""
    from deepencoder_kernels.cli import main

    assert main(["profile", "--mode", "base", "--repeat", "0", "--quiet", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "times: not measured" in out and "1109.6" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["pass_seconds"] == [] and data["total_flops"] == pytest.approx(1109.6e9, rel=1e-4)


def meta_profile_v2(mode, image=None):
    with torch.device("meta"):
        from deepencoder_kernels.modules import DeepEncoderV2

        enc = DeepEncoderV2().to(torch.bfloat16)
    return profiler.profile(mode, image=image, encoder=enc, device="meta", progress=False)


def test_v2_view_flops_match_the_spec():
    """deepencoder-v2.md section 6 (FlopCounterMode over upstream's modules): per 1024 view patch 4.8,
    windowed 519.5 (window padding included as upstream runs it), global 441.3, neck+net_2+net_3 11.0,
    Qwen2 389.0 (prefix-LM SDPA counted densely), projector 0.6: 1366.2."""
    from PIL import Image

    p = meta_profile_v2("base")
    assert p.model == "v2" and p.views == 1 and p.output_tokens == 257
    f = {s.name: s.flops / G for s in p.stages}
    pad = profiler.window_padding_flops(1024) / G
    assert f["patch embed"] == pytest.approx(4.8, abs=0.05)
    assert f["windowed blocks"] + pad == pytest.approx(519.5, abs=0.1)
    assert f["global blocks"] == pytest.approx(441.3, abs=0.1)
    assert f["neck+compressor"] == pytest.approx(11.0, abs=0.05)
    assert f["causal flow"] == pytest.approx(389.0, abs=0.1)
    assert f["projector"] == pytest.approx(0.6, abs=0.05)
    assert "CLIP" not in f
    assert (p.total_flops + p.padding_flops) / G == pytest.approx(1366.2, abs=0.05)
    assert p.prefix_lm_flops["needed"] / p.prefix_lm_flops["dense"] == pytest.approx(0.625, abs=0.002)
    # a 2 x 3 tile page: + 728.0 per 768 tile
    six = meta_profile_v2("dynamic", Image.new("RGB", (1200, 1800), "white"))
    assert six.views == 7 and six.output_tokens == 257 + 6 * 144
    assert (six.total_flops + six.padding_flops) / G == pytest.approx(1366.2 + 6 * 728.0, abs=0.3)
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in six.claims}
    assert verdicts["paper"] == "within (256 + 144 x 6)" and verdicts["README"] == "within"
    assert next(c for c in six.claims if c["claim"].startswith("upstream counted"))["verdict"] == "equal"
    text = profiler.format_report(six)
    assert "DeepEncoder V2" in text and "causal flow" in text and "62.6%" in text


def test_v2_profile_times_a_small_encoder(capsys):
    from conftest import small_encoder_v2

    p = profiler.profile("dynamic", encoder=small_encoder_v2(), dtype=torch.float32, progress=False, repeat=1)
    assert p.model == "v2" and p.pass_seconds and p.stage("causal flow").seconds > 0
    assert "varlen_attention" in p.backends and p.tile_size == 768 and p.views == 7
    with pytest.raises(ValueError, match="mode must be one of \\['base', 'dynamic'\\] for model v2"):
        profiler.profile("gundam", encoder=small_encoder_v2(), progress=False, repeat=0)


def test_cli_profile_v2_prints_counted_flops(capsys):
    from deepencoder_kernels.cli import main

    assert main(["profile", "--model", "v2", "--mode", "base", "--repeat", "0", "--quiet", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "DeepEncoder V2 (DeepSeek-OCR 2) profile: mode=base" in out and "total 1366.2 as upstream runs it" in out


def test_counting_pass_leaves_no_fake_packing_behind():
    """A Packing made while the counting pass runs on fake tensors is not cached: the timed passes
    after it (and any later real run of that batch shape) build real device metadata."""
    from deepencoder_kernels.modules import packing
    from conftest import small_encoder_v2

    packing._CACHE.clear()
    profiler.profile("base", encoder=small_encoder_v2(), dtype=torch.float32, progress=False, repeat=0)
    assert not packing._CACHE
    real = packing.Packing.of_prefix_lm([256], "cpu")
    assert real.cu_seqlens.tolist() == [0, 512] and real.prefix_lens.tolist() == [256]
