"""DeepEncoder V2 (DeepSeek-OCR 2): names, the causal-flow stage against transformers' own Qwen2Model,
views and token layout, dynamic-resolution pages, packed = page by page."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from deepencoder_kernels.preprocess import choose_tile_grid, to_pixels
from conftest import assert_close, small_encoder_v2
from upstream import UpstreamImageEncoderViT

transformers = pytest.importorskip("transformers", reason="the oracle for the causal-flow stage is transformers' Qwen2Model")


def test_state_dict_is_deepseek_ocr2_vision_checkpoint():
    """The 473 vision tensors of DeepSeek-OCR 2 (spec: deepencoder-v2.md section 5), names and shapes."""
    with torch.device("meta"):
        enc = dk.DeepEncoderV2()
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert len(shapes) == 473
    by_root = {}
    for k in shapes:
        by_root[k.split(".")[0]] = by_root.get(k.split(".")[0], 0) + 1
    assert by_root == {"sam_model": 179, "qwen2_model": 291, "projector": 2, "view_seperator": 1}
    assert sum(k.startswith("qwen2_model.model.model.layers.") for k in shapes) == 24 * 12
    expected = {
        "sam_model.net_2.weight": (512, 256, 3, 3), "sam_model.net_3.weight": (896, 512, 3, 3),
        "qwen2_model.model.model.layers.23.self_attn.q_proj.weight": (896, 896),
        "qwen2_model.model.model.layers.0.self_attn.q_proj.bias": (896,),
        "qwen2_model.model.model.layers.0.self_attn.k_proj.weight": (128, 896),
        "qwen2_model.model.model.layers.0.self_attn.v_proj.bias": (128,),
        "qwen2_model.model.model.layers.0.self_attn.o_proj.weight": (896, 896),
        "qwen2_model.model.model.layers.5.mlp.gate_proj.weight": (4864, 896),
        "qwen2_model.model.model.layers.5.mlp.down_proj.weight": (896, 4864),
        "qwen2_model.model.model.layers.5.input_layernorm.weight": (896,),
        "qwen2_model.model.model.layers.5.post_attention_layernorm.weight": (896,),
        "qwen2_model.model.model.norm.weight": (896,),
        "qwen2_model.query_768.weight": (144, 896), "qwen2_model.query_1024.weight": (256, 896),
        "projector.layers.weight": (1280, 896), "projector.layers.bias": (1280,), "view_seperator": (1280,),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert "qwen2_model.model.model.layers.0.self_attn.o_proj.bias" not in shapes
    assert not any("rotary" in k or "embed_tokens" in k for k in shapes)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (round(n(enc.sam_model) / 1e6, 2), round(n(enc.qwen2_model) / 1e6, 2), round(n(enc.projector) / 1e6, 2)) == (94.98, 358.26, 1.15)


def _oracle(enc, pixels):
    """DeepSeek-OCR 2's encoder as its code runs it, from independent parts: SAM as upstream's
    ``ImageEncoderViT`` stand-in, the decoder as transformers' own ``Qwen2Model`` over
    [image tokens; queries] with the dense prefix-LM float mask passed as vLLM's port passes it
    (``attention_mask={"full_attention": mask}``), the query outputs, the projector."""
    from transformers import Qwen2Config, Qwen2Model

    sam = enc.sam_model
    up = UpstreamImageEncoderViT(dim=64, depth=3, num_heads=1, window_size=14, global_blocks=(1,), pos_grid=64, cn=16, c3=32)
    up.load_state_dict(sam.state_dict())
    flow = enc.qwen2_model
    layer = flow.decoder.layers[0]
    conf = Qwen2Config(hidden_size=32, num_hidden_layers=len(flow.decoder.layers), num_attention_heads=layer.self_attn.num_heads,
                       num_key_value_heads=layer.self_attn.num_kv_heads, head_dim=layer.self_attn.head_dim,
                       intermediate_size=layer.mlp.gate_proj.out_features, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, vocab_size=8, attn_implementation="sdpa")
    qwen2 = Qwen2Model(conf).to(pixels.dtype)
    missing = qwen2.load_state_dict(flow.decoder.state_dict(), strict=False)
    assert missing.missing_keys == ["embed_tokens.weight"] and not missing.unexpected_keys
    up = up.to(pixels.dtype)
    with torch.no_grad():
        x = up(pixels).flatten(2).transpose(1, 2)                       # [B, n, 32]
        B, n, _ = x.shape
        bank = flow.query_768 if n == 144 else flow.query_1024
        seq = torch.cat([x, bank.weight.to(x.dtype)[None].expand(B, -1, -1)], 1)
        L = 2 * n
        mask = torch.full((L, L), torch.finfo(x.dtype).min, dtype=x.dtype)
        mask[:, :n] = 0                                                  # every row sees the image tokens
        for i in range(n, L):                                            # query rows: causal over the queries
            mask[i, n:i + 1] = 0
        out = qwen2(inputs_embeds=seq, attention_mask={"full_attention": mask[None, None].expand(B, 1, L, L)}).last_hidden_state
        return enc.projector.layers(out[:, n:])


@pytest.mark.parametrize("side", [768, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_pixels_matches_transformers_qwen2_with_prefix_mask(side, dtype):
    enc = small_encoder_v2(dtype=dtype)
    torch.manual_seed(1)
    pixels = (torch.rand(2, 3, side, side) * 2 - 1).to(dtype)
    with torch.no_grad():
        got = enc.encode_pixels(pixels)
    n = (side // 64) ** 2
    assert got.shape == (2, n, 24) and got.dtype == dtype
    want = _oracle(enc, pixels)
    if dtype == torch.float32:
        assert_close(got, want, dtype)
    else:   # bf16 rounds at different points than transformers' (fused Linears, packed batch): norm-wise
        assert_close(got.float(), _oracle(enc.float(), pixels.float()), torch.bfloat16)


def test_causal_flow_is_prefix_lm():
    """Image-token outputs do not depend on the queries; query i does not depend on later queries."""
    flow = small_encoder_v2().qwen2_model
    tokens = torch.randn(1, 144, 32)
    seq = torch.cat([tokens, flow.queries(144)[None]], 1)[0]
    from deepencoder_kernels.modules.packing import Packing
    packing = Packing.of_prefix_lm([144], "cpu")
    rope = flow.rope(288, torch.float32, "cpu")
    with torch.no_grad():
        base = flow.decoder(seq, packing, rope)
        changed = seq.clone()
        changed[200:] += 1.0                                             # queries 56.. change
        out = flow.decoder(changed, packing, rope)
    assert torch.equal(out[:200], base[:200]) or torch.allclose(out[:200], base[:200], atol=1e-6, rtol=0)
    assert not torch.allclose(out[200:], base[200:])


def test_other_view_sizes_are_refused_naming_the_two_that_exist():
    enc = small_encoder_v2()
    with pytest.raises(ValueError, match=r"must be one of \(768, 1024\)"):
        enc.encode_pixels(torch.zeros(1, 3, 640, 640))
    with pytest.raises(ValueError, match="144 \\(768 px\\) or 256 \\(1024 px\\)"):
        enc.qwen2_model(torch.zeros(1, 100, 32))


def _page(size, seed=0):
    """A synthetic page with text-like strokes (no personal data)."""
    img = Image.new("RGB", size, (250, 248, 240))
    draw = ImageDraw.Draw(img)
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        x, y = (torch.randint(0, s - 20, (1,), generator=g).item() for s in size)
        draw.rectangle((x, y, x + 15, y + 3), fill=(20, 20, 20))
    return img


@pytest.mark.parametrize("size,grid", [
    ((700, 500), (1, 1)), ((1536, 768), (2, 1)), ((2304, 800), (3, 1)), ((1536, 1536), (2, 2)),
    ((3840, 768), (5, 1)), ((2304, 1536), (3, 2)), ((768, 4600), (1, 6)),
])
def test_dynamic_views_are_deepseek_ocr2s_processor(size, grid):
    """The PIL calls of DeepSeek-OCR 2's processor, written out: a 1024 letterbox (gray 127), tiles of
    768 only when a side exceeds 768 (2..6 by the aspect rule), resized with PIL's default filter."""
    img = _page(size)
    views = dk.preprocess(img, "dynamic", model="v2")
    assert torch.equal(views.global_view, to_pixels(ImageOps.pad(img, (1024, 1024), color=(127, 127, 127))))
    assert views.grid == grid
    if grid == (1, 1):
        assert views.tiles is None and max(size) <= 768
        return
    assert choose_tile_grid(*size, 768, 2, 6) == grid
    n_w, n_h = grid
    resized = img.resize((768 * n_w, 768 * n_h))
    want = [to_pixels(resized.crop((c * 768, r * 768, (c + 1) * 768, (r + 1) * 768))) for r in range(n_h) for c in range(n_w)]
    assert torch.equal(views.tiles, torch.stack(want))


def test_base_mode_is_crop_mode_off():
    """Crop mode off: ``resize((768, 768))`` first, then padded (upscaled) into the 1024 view."""
    img = _page((900, 1300))
    views = dk.preprocess(img, "base", model="v2")
    want = ImageOps.pad(img.resize((768, 768)), (1024, 1024), color=(127, 127, 127))
    assert views.tiles is None and torch.equal(views.global_view, to_pixels(want))
    with pytest.raises(ValueError, match=r"mode must be one of \['base', 'dynamic'\] for model v2"):
        dk.preprocess(img, "gundam", model="v2")


@pytest.mark.parametrize("size,tiles", [((700, 500), 0), ((1536, 768), 2), ((2304, 800), 3), ((1536, 1536), 4),
                                        ((3840, 768), 5), ((2304, 1536), 6)])
def test_dynamic_token_counts_and_layout(size, tiles):
    """257 + 144 k tokens: every tile's queries (row-major tiles), the global view's 256, the separator."""
    enc = small_encoder_v2()
    img = _page(size)
    out = enc.encode(img, "dynamic")[0]
    assert out.shape == (257 + 144 * tiles, 24)
    views = enc.preprocess(img, "dynamic")
    assert dk.token_count("dynamic", views.grid, model="v2") == 257 + 144 * tiles
    assert torch.equal(out[-1], enc.view_seperator)
    with torch.no_grad():
        global_feats = enc.encode_pixels(views.global_view[None])[0]
        assert_close(out[-257:-1], global_feats, torch.float32)
        if tiles:
            tile_feats = enc.encode_pixels(views.tiles)
            assert_close(out[:-257], tile_feats.reshape(-1, 24), torch.float32)


def test_packed_batch_equals_page_by_page():
    """Pages of 0, 2 and 6 tiles and a crop-mode-off page in one packed pass (sequences of 288 and 512
    in one causal-flow call) = each page alone."""
    enc = small_encoder_v2()
    pages = [_page((700, 500), 1), _page((1536, 768), 2), _page((2304, 1536), 3), _page((900, 1300), 4)]
    modes = ["dynamic", "dynamic", "dynamic", "base"]
    packed = enc.encode_batch(pages, modes)
    dk.clear_last_backends()
    alone = [enc.encode(p, m)[0] for p, m in zip(pages, modes)]
    assert [p.shape[0] for p in packed] == [257, 545, 1121, 257]
    for p, a in zip(packed, alone):
        assert_close(p, a, torch.float32)
    assert "varlen_attention" in dk.last_backends()


def _native_names(state):
    """DeepSeek's names -> transformers' native deepseek_ocr2 names, by transformers' own conversion
    mapping (its vision renames, first match), under the native model's ``model.`` prefix."""
    import re

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    vision = ("sam_model", "qwen2_model", "projector", "view_seperator")
    renames = [(r.source_patterns[0], r.target_patterns[0]) for r in get_checkpoint_conversion_mapping("deepseek_ocr2")
               if isinstance(r, WeightRenaming) and any(root in r.source_patterns[0] for root in vision)]
    out = {}
    for k, v in state.items():
        name = k
        for src, dst in renames:
            if re.search(src, name):
                name = re.sub(src, dst, name)
                break
        out["model." + name] = v
    return out


def test_load_checkpoint_deepseek_and_transformers_layouts(tmp_path):
    """A synthetic checkpoint in DeepSeek's layout (with and without ``model.``, plus language-model
    keys that are skipped) and in transformers' native layout load to the same tensors."""
    from safetensors.torch import save_file

    src = small_encoder_v2(seed=3)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    extra = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2)}
    save_file({**{"model." + k: v for k, v in state.items()}, **extra}, tmp_path / "hub.safetensors")
    save_file(state, tmp_path / "bare.safetensors")
    native = _native_names(state)
    assert "model.vision_tower.sam_encoder.layers.0.layer_norm1.weight" in native
    assert "model.vision_tower.vision_encoder.layers.1.self_attn.k_proj.bias" in native
    assert {"model.multi_modal_projector.weight", "model.view_separator", "model.vision_tower.query_768_resolution.weight",
            "model.vision_tower.sam_encoder.proj.conv2.weight", "model.vision_tower.sam_encoder.neck.layer_norm2.bias"} <= set(native)
    save_file(native, tmp_path / "native.safetensors")
    for name in ("hub", "bare", "native"):
        dst = small_encoder_v2(seed=9)
        report = dst.load_checkpoint(tmp_path / f"{name}.safetensors")
        assert report["missing"] == [] and len(report["loaded"]) == len(state)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)


def test_load_checkpoint_lists_missing_and_mis_shaped(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in small_encoder_v2().state_dict().items()}
    state.pop("qwen2_model.query_768.weight")
    state["sam_model.net_3.weight"] = torch.zeros(1024, 16, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"does not fit DeepEncoderV2:\n  1 missing keys: qwen2_model.query_768.weight\n"
                                         r"  1 mis-shaped keys: sam_model.net_3.weight: checkpoint \[1024, 16, 3, 3\]"):
        small_encoder_v2().load_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("call", ["encode", "encode_batch"])
def test_a_bad_page_never_costs_the_others(tmp_path, call):
    """``on_error`` gets the index and an error naming the file; the other pages are encoded, the bad
    one's slot is None. Without ``on_error`` the named error is raised."""
    enc = small_encoder_v2()
    good = tmp_path / "good.png"
    _page((700, 500)).save(good)
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[:200])
    errors = []
    out = getattr(enc, call)([good, bad, good], "base", on_error=lambda i, e: errors.append((i, str(e))))
    assert [None if t is None else t.shape[0] for t in out] == [257, None, 257]
    assert [i for i, _ in errors] == [1] and str(bad) in errors[0][1]
    with pytest.raises(Exception, match="cut.png"):
        getattr(enc, call)([good, bad], "base")
