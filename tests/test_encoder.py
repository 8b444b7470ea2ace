"""DeepEncoder: names, token layout, preprocessing, checkpoint loading."""
import pytest
import torch
from PIL import Image

import deepencoder_kernels as dk
from deepencoder_kernels.preprocess import choose_tile_grid
from conftest import small_encoder


def test_state_dict_keys_are_the_checkpoint_vision_keys():
    enc = dk.DeepEncoder()
    keys = set(enc.state_dict())
    expected = {
        "sam_model.patch_embed.proj.weight", "sam_model.pos_embed", "sam_model.blocks.0.attn.qkv.weight",
        "sam_model.blocks.2.attn.rel_pos_h", "sam_model.neck.0.weight", "sam_model.neck.1.bias",
        "sam_model.neck.2.weight", "sam_model.neck.3.weight", "sam_model.net_2.weight", "sam_model.net_3.weight",
        "vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
        "vision_model.transformer.layers.23.self_attn.qkv_proj.weight", "vision_model.transformer.layers.0.mlp.fc2.bias",
        "projector.layers.weight", "projector.layers.bias", "image_newline", "view_seperator",
    }
    assert expected <= keys
    assert "vision_model.embeddings.position_ids" not in keys
    assert all(k.split(".")[0] in {"sam_model", "vision_model", "projector", "image_newline", "view_seperator"} for k in keys)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["sam_model.blocks.2.attn.rel_pos_h"] == (127, 64)
    assert shapes["sam_model.blocks.0.attn.rel_pos_w"] == (27, 64)
    assert shapes["sam_model.net_3.weight"] == (1024, 512, 3, 3)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes["projector.layers.weight"] == (1280, 2048)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(n(enc.sam_model) / 1e6, 1) == 95.6
    assert round(n(enc.vision_model) / 1e6, 1) == 303.2
    assert round(n(enc.projector) / 1e6, 1) == 2.6


@pytest.mark.parametrize("mode,tokens", [("tiny", 73), ("small", 111), ("base", 273), ("large", 421)])
def test_native_mode_token_counts(mode, tokens):
    enc = small_encoder()
    out = enc.encode(Image.new("RGB", (900, 700), "white"), mode)
    assert len(out) == 1 and out[0].shape == (tokens, 24)
    assert dk.token_count(mode) == tokens
    assert torch.equal(out[0][-1], enc.view_seperator)


@pytest.mark.parametrize("size,grid", [((1300, 700), (2, 1)), ((600, 600), (1, 1)), ((2000, 1300), (3, 2))])
def test_gundam_tokens_and_order(size, grid):
    enc = small_encoder()
    views = dk.preprocess(Image.new("RGB", size, "gray"), "gundam")
    assert views.grid == grid
    out = enc.encode_views(views)
    n_w, n_h = grid
    tiled = n_w * n_h > 1
    expect = 10 * n_h * (10 * n_w + 1) + 273 if tiled else 273
    assert out.shape[0] == expect == dk.token_count("gundam", grid)
    # newline after each of the 10 n_h local rows (10 n_w wide), then 16 global rows, then the separator
    newline_at = [i for i in range(out.shape[0]) if torch.equal(out[i], enc.image_newline)]
    local_rows = 10 * n_h if tiled else 0
    want = [(r + 1) * (10 * n_w + 1) - 1 for r in range(local_rows)]
    base = local_rows * (10 * n_w + 1)
    want += [base + (r + 1) * 17 - 1 for r in range(16)]
    assert newline_at == want
    assert torch.equal(out[-1], enc.view_seperator)


def test_gundam_local_rows_run_across_tiles():
    """Row r of the local grid is [tile(0) row r | tile(1) row r | ...] for the tile row."""
    enc = small_encoder()
    D, t = 24, 10
    tile_feats = torch.arange(2 * t * t, dtype=torch.float32).view(2, t * t, 1).expand(2, t * t, D)
    global_feats = torch.zeros(256, D)
    out = enc.layout(global_feats, tile_feats, (2, 1))
    first_row = out[: 2 * t, 0].tolist()
    assert first_row == list(range(t)) + list(range(100, 100 + t))


def test_tile_grid_choice():
    assert choose_tile_grid(1300, 700) == (2, 1)
    assert choose_tile_grid(700, 1300) == (1, 2)
    assert choose_tile_grid(1240, 1754) == (2, 3)            # A4 portrait
    # square image: (1,1) excluded (min 2 crops), ties between 2x2 and 3x3 go to 3x3 only when the
    # image area exceeds half of 3x3 tiles
    assert choose_tile_grid(1000, 1000) == (2, 2)
    assert choose_tile_grid(2000, 2000) == (3, 3)
    assert choose_tile_grid(3000, 600, max_crops=6) == (5, 1)


def test_preprocess_normalises_and_letterboxes():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    v = dk.preprocess(img, "base")
    assert v.global_view.shape == (3, 1024, 1024) and v.tiles is None
    assert v.global_view[:, 512, 512].tolist() == [1.0, 1.0, 1.0]          # white -> 1
    gray = (127 / 255 - 0.5) / 0.5
    torch.testing.assert_close(v.global_view[:, 5, 512], torch.full((3,), gray))  # letterbox band
    t = dk.preprocess(img, "tiny").global_view
    assert t.shape == (3, 512, 512) and t.min() > 0.99                        # stretched, no bands
    with pytest.raises(ValueError, match="mode must be one of"):
        dk.preprocess(img, "huge")
    with pytest.raises(TypeError, match="PIL image or a path"):
        dk.preprocess(123, "base")


def test_encode_pixels_contract():
    enc = small_encoder()
    out = enc.encode_pixels(torch.randn(2, 3, 512, 512))
    assert out.shape == (2, 73, 24)
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, S, S\]"):
        enc.encode_pixels(torch.randn(3, 512, 512))
    with pytest.raises(ValueError, match="multiple of 16"):
        enc.encode_pixels(torch.randn(1, 3, 500, 500))
    sam = enc.sam_model(torch.randn(1, 3, 512, 512))
    assert sam.shape == (1, 32, 8, 8)
    assert enc.vision_model(None, sam).shape == (1, 65, 32)


def _write(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_checkpoint_roundtrip_with_prefix_and_foreign_keys(tmp_path):
    src, dst = small_encoder(seed=1), small_encoder(seed=2)
    state = {f"model.{k}": v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(4, 4)   # a language-model key: ignored
    state["lm_head.weight"] = torch.zeros(2, 2)
    half = len(state) // 2
    items = list(state.items())
    _write(tmp_path / "model-00001.safetensors", dict(items[:half]))
    _write(tmp_path / "model-00002.safetensors", dict(items[half:]))
    report = dst.load_checkpoint(tmp_path)
    assert report["missing"] == [] and len(report["loaded"]) == len(src.state_dict())
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v.to(torch.bfloat16).float())
    # unprefixed single file works too
    _write(tmp_path / "plain.safetensors", src.state_dict())
    small_encoder(seed=3).load_checkpoint(tmp_path / "plain.safetensors")


def test_checkpoint_errors_list_missing_and_misshaped(tmp_path):
    enc = small_encoder()
    state = dict(enc.state_dict())
    state.pop("image_newline")
    state["projector.layers.bias"] = torch.zeros(5)
    _write(tmp_path / "bad.safetensors", state)
    with pytest.raises(ValueError, match=r"1 missing keys: image_newline[\s\S]*projector.layers.bias: checkpoint \[5\]"):
        enc.load_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        enc.load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        enc.load_checkpoint(tmp_path / "empty")
