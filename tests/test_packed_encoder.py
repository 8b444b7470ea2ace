"""The packed mixed-budget encoder: one batch of views of every size equals encoding each image alone."""
import pytest
import torch
from PIL import Image

import deepencoder_kernels as dk
from deepencoder_kernels.modules import SaccadeSelector
from deepencoder_kernels.modules.packing import Packing
from conftest import assert_close, by_device, fused_backend, small_encoder

MIXED = [((900, 700), "tiny"), ((640, 640), "small"), ((1100, 800), "base"), ((700, 1000), "large"),
         ((2000, 1300), "gundam"), ((1300, 700), "gundam"), ((600, 600), "gundam")]


def images(spec):
    torch.manual_seed(0)
    out = []
    for (w, h), _ in spec:  # noise, so every view and tile carries different pixels
        out.append(Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()))
    return out


def test_packed_batch_equals_one_image_at_a_time():
    enc = small_encoder()
    imgs, modes = images(MIXED), [m for _, m in MIXED]
    with dk.backend("reference"):
        packed = enc.encode_batch(imgs, modes)
        alone = [enc.encode(img, mode)[0] for img, mode in zip(imgs, modes)]
    assert [p.shape for p in packed] == [a.shape for a in alone]
    assert [p.shape[0] for p in packed[:4]] == [73, 111, 273, 421]
    for p, a, mode in zip(packed, alone, modes):
        assert_close(p, a, torch.float32, msg=mode)


def test_packed_batch_with_saccades_and_a_query():
    enc = small_encoder()
    enc.saccades = SaccadeSelector(feature_dim=64, out_dim=24, query_dim=5, budget_ratio=0.1).eval()
    imgs, modes = images(MIXED[:3]), [m for _, m in MIXED[:3]]
    query = torch.randn(5)
    packed = enc.encode_batch(imgs, modes, query=query)
    alone = [enc.encode(img, mode, query=query)[0] for img, mode in zip(imgs, modes)]
    for p, a in zip(packed, alone):
        assert p.shape == a.shape
        assert_close(p, a, torch.float32)


def test_modes_must_match_images():
    with pytest.raises(ValueError, match="modes must be one mode or one per image: got 2 modes for 3 images"):
        small_encoder().encode_batch([Image.new("RGB", (64, 64))] * 3, ["tiny", "base"])


def test_packing_offsets():
    p = Packing.of_grids([(2, 3), (4, 4), (1, 1)], "cpu")
    assert p.cu_seqlens.tolist() == [0, 6, 22, 23] and p.max_seqlen == 16
    assert p.grid_hw.tolist() == [[2, 3], [4, 4], [1, 1]]
    assert Packing.of_lengths([], "cpu").cu_seqlens.tolist() == [0]


EDGE_DEVICES = by_device([()], [()], ids=lambda c: "small")


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_packed_trunk_on_the_fused_kernels(device):
    """SAM trunk over views of three sizes (grids 8 / 10 / 12 with 4x4 windows: partial windows on
    two of them, batch 2 in one group), global blocks packed through the varlen kernel with per-grid
    rel-pos, in Triton's interpreter, against each group alone on the reference."""
    from deepencoder_kernels.modules import SamEncoder

    torch.manual_seed(0)
    sam = SamEncoder(dim=64, depth=3, num_heads=1, window_size=4, global_blocks=(1,), neck_dim=16, out_dim=32).eval()
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
    sam.to(device)
    groups = [torch.randn(2, 3, 128, 128), torch.randn(1, 3, 160, 160), torch.randn(1, 3, 192, 192)]
    groups = [g.to(device) for g in groups]
    backend = fused_backend(device)
    with torch.no_grad():
        with dk.backend(backend):
            packed = sam.trunk_groups(groups)
        used = {op: c.backend for op, c in dk.last_backends().items()}
        assert used["varlen_attention"] == backend and used["rel_pos_attention"] == backend
        with dk.backend("reference"):
            alone = [sam.trunk(g) for g in groups]
    for p, a in zip(packed, alone):
        assert_close(p, a, torch.float32)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_packed_clip_on_the_fused_kernel(device):
    enc = small_encoder().to(device)
    groups = [torch.randn(2, 4, 32), torch.randn(3, 9, 32), torch.randn(1, 16, 32)]  # Tiny-, Small-, Base-like grids
    groups = [g.to(device) for g in groups]
    with torch.no_grad():
        with dk.backend(fused_backend(device)):
            packed = enc.vision_model.from_token_groups(groups)
        assert dk.last_backends()["varlen_attention"].backend == fused_backend(device)
        with dk.backend("reference"):
            alone = [enc.vision_model.from_tokens(g) for g in groups]
    for p, a in zip(packed, alone):
        assert_close(p, a, torch.float32)


@pytest.mark.slow
def test_full_size_packed_equals_alone_on_the_reference():
    """The real DeepEncoder (seeded random weights, fp32): a Tiny and a Small page in one batch
    (two grid sizes through the packed global blocks, CLIP sequences of 65 and 101)."""
    from deepencoder_kernels.profiler import random_encoder

    enc = random_encoder()
    spec = MIXED[:2]
    imgs, modes = images(spec), [m for _, m in spec]
    with dk.backend("reference"):
        packed = enc.encode_batch(imgs, modes)
        alone = [enc.encode(img, mode)[0] for img, mode in zip(imgs, modes)]
    for p, a in zip(packed, alone):
        assert p.shape == a.shape
        assert_close(p, a, torch.float32)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_packed_mixed_modes_on_cuda(dtype):
    """The real DeepEncoder (seeded random weights) on CUDA, compiled Triton: one packed batch of every
    mode, Gundam tiles included (windowed groups of 512/640/1024/1280 px, global blocks packed over grids
    32/40/64/80, CLIP sequences of 65/101/257/401), equals each image alone on the same kernels; in
    fp32 also the reference alone (fp16's tolerance: 36 layers of fp32 rounding, kernel vs torch order)."""
    from deepencoder_kernels.profiler import random_encoder

    enc = random_encoder(dtype=dtype, device="cuda")
    imgs, modes = images(MIXED), [m for _, m in MIXED]
    with dk.backend("triton"):
        packed = enc.encode_batch(imgs, modes)
        assert dk.last_backends()["varlen_attention"].backend == "triton"
        alone = [enc.encode(img, mode)[0] for img, mode in zip(imgs, modes)]
    assert [p.shape for p in packed] == [a.shape for a in alone]
    for p, a, mode in zip(packed, alone, modes):
        assert p.device.type == "cuda" and p.dtype == dtype
        if dtype == torch.float32:
            assert_close(p, a, dtype, msg=mode)
        else:   # other GEMM batch sizes round differently, and 36 bf16 layers carry it: norm-wise, then
            rel = ((p.float() - a.float()).norm() / a.float().norm()).item()   # (a wrong grid or table is O(1))
            assert rel < 2e-2, f"{mode}: packed vs alone relative error {rel:.3g}"
    if dtype == torch.float32:
        with dk.backend("reference"):
            oracle = [enc.encode(img, mode)[0] for img, mode in zip(imgs, modes)]
        for p, o, mode in zip(packed, oracle, modes):
            assert_close(p, o, torch.float16, msg=f"{mode} vs reference")
