"""The profiler: FLOPs at the real shapes (counted on the meta device), tracked bytes, report."""
import json

import pytest
import torch

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
    assert p.output_tokens == 73 and p.backends["rel_pos_attention"] == "reference"
    glob = p.stage("global blocks")
    assert glob.calls == 1 and glob.largest_tensor_bytes >= 1024 * 1024 * 4   # the dense [1, 1, 1024, 1024] bias
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
