"""Any view size upstream's SAM takes (a multiple of 16, square): shapes, values and token counts
follow the convs, ceil(ceil((S / 16) / 2) / 2), not S // 64."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from deepencoder_kernels.modules import SamEncoder
from deepencoder_kernels.preprocess import Views
from conftest import small_encoder
from upstream import UpstreamImageEncoderViT

SIZES = [(160, 3), (224, 4), (400, 7), (512, 8), (208, 4)]   # (S, compressed side); 160/224/400/208 are not multiples of 64


@pytest.mark.parametrize("size,side", SIZES)
def test_grid_rule_follows_the_convs(size, side):
    assert cfg.compressed_grid(size) == side
    x = torch.nn.functional.conv2d(torch.zeros(1, 1, size // 16, size // 16), torch.zeros(1, 1, 3, 3), stride=2, padding=1)
    x = torch.nn.functional.conv2d(x, torch.zeros(1, 1, 3, 3), stride=2, padding=1)
    assert x.shape[-1] == side
    assert cfg.view_tokens(size) == side * (side + 1)


@pytest.mark.parametrize("size,side", SIZES[:3])
def test_sam_model_matches_upstream_at_sizes_not_multiple_of_64(size, side):
    ours = small_encoder().sam_model
    theirs = UpstreamImageEncoderViT(dim=64, depth=3, num_heads=1, window_size=cfg.SAM_WINDOW, global_blocks=(1,),
                                     pos_grid=cfg.SAM_POS_GRID, cn=16, c3=32).eval()
    theirs.load_state_dict(ours.state_dict())
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got, want = ours(pixels), theirs(pixels)
    assert got.shape == want.shape == (2, 32, side, side)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("size,side", SIZES[:3])
def test_encode_token_counts_and_packed_at_other_sizes(size, side):
    enc = small_encoder()
    pixels = torch.randn(1, 3, size, size)
    alone = enc.encode_pixels(pixels)
    assert alone.shape == (1, side * (side + 1) + 1, 24)
    # packed with a Tiny view: same tokens as alone
    packed = enc.encode_views_packed([Views(pixels[0], None), Views(torch.randn(3, 512, 512), None)])
    assert packed[0].shape == alone[0].shape and packed[1].shape[0] == dk.token_count("tiny")
    torch.testing.assert_close(packed[0], alone[0], atol=2e-5, rtol=2e-5)


def test_sizes_upstream_cannot_take_are_clear_errors():
    enc = small_encoder()
    with pytest.raises(ValueError, match=r"pixels's side must be a positive multiple of 16"):
        enc.encode_pixels(torch.randn(1, 3, 500, 500))
    with pytest.raises(ValueError, match=r"pixels must be square"):
        enc.sam_model(torch.randn(1, 3, 160, 224))
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, S, S\]"):
        enc.sam_model(torch.randn(3, 160, 160))
    with pytest.raises(ValueError, match=r"pixel_groups\[1\]'s side must be a positive multiple of 16"):
        enc.sam_model.trunk_groups([torch.randn(1, 3, 160, 160), torch.randn(1, 3, 170, 170)])
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        cfg.compressed_grid(100)
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        cfg.sam_grid(0)


def test_full_size_shapes_on_meta_at_224():
    """The full-size model (64x64 positions, 127-row global tables) at 224 px, shapes only."""
    with torch.device("meta"):
        sam = SamEncoder()
        out = sam(torch.empty(1, 3, 224, 224))
    assert out.shape == (1, cfg.SAM_OUT_DIM, 4, 4)
