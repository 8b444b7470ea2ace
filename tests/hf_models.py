"""Small random-weight models built from transformers' real classes (configs only, nothing downloaded):
its native ``sam`` (SamModel, mask decoder included) and ``deepseek_ocr2``
(DeepseekOcr2ForConditionalGeneration, language model included), and DeepSeek-OCR v1's port layout
(transformers' pending port uses deepseek_ocr2's SAM encoder names with a 1024-channel compressor and
transformers' CLIP encoder: ``layers[i].self_attn.{q,k,v,out_proj}`` returning ``(out, weights)``
through the AttentionInterface), assembled here from those real classes.

Sizes keep Triton's interpreter quick: SAM width 64 with 2 heads of 32 (fused head dims), an 8 x 8 patch
grid at 128 px (4 x 4 windows, one global block), a 2 x 2 compressed grid; the causal-flow decoder
width 64 with 4 query heads and 2 KV heads of 16.
"""
from __future__ import annotations

import torch
import torch.nn as nn

transformers = __import__("pytest").importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

SAM = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=128, patch_size=16, mlp_dim=128,
           window_size=4, global_attn_indexes=[1], output_channels=16)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (transformers initialises rel-pos tables and pos embeddings to zero and
    SAM's weights at std 1e-10, which would hide any difference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = any(k in name for k in ("rel_pos", "pos_embed", "bias", "query", "class_embedding", "position"))
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if big else 0.1))
    return model.eval()


def sam_model(attn: str = "sdpa", seed: int = 0):
    from transformers import SamConfig, SamModel

    cfg = SamConfig(vision_config=SAM, attn_implementation=attn,
                    prompt_encoder_config=dict(hidden_size=16, image_size=128, image_embedding_size=8),
                    mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                             iou_head_hidden_dim=16))
    return randomise(SamModel(cfg), seed)


def ocr2_config(attn: str = "sdpa"):
    from transformers import DeepseekOcr2Config

    return DeepseekOcr2Config(
        vision_config=dict(sam_config=dict(SAM, downsample_channels=[32, 64]),
                           encoder_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=16, max_position_embeddings=1024)),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=64, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, mlp_layer_types=["dense"]),
        attn_implementation=attn)


def ocr2_model(attn: str = "sdpa", seed: int = 0):
    from transformers import DeepseekOcr2ForConditionalGeneration

    return randomise(DeepseekOcr2ForConditionalGeneration(ocr2_config(attn)), seed)


class V1PortClip(nn.Module):
    """DeepEncoder v1's CLIP in transformers' layout: CLS + positions over SAM's compressed grid,
    ``pre_layrnorm``, transformers' ``CLIPEncoder`` (q/k/v attentions through the AttentionInterface)."""

    def __init__(self, config, grid: int):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoder

        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(grid * grid + 1, config.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.encoder = CLIPEncoder(config)

    def forward(self, sam_features):
        x = sam_features.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.position_embedding.weight[: x.shape[1] + 1]
        return self.encoder(self.pre_layrnorm(x)).last_hidden_state


class V1PortVisionTower(nn.Module):
    """``vision_tower``: ``sam_encoder`` (deepseek_ocr2's SAM encoder class, compressor to the CLIP width)
    and ``clip_encoder``; output [B, h*w, 2 * width] (CLIP without CLS, then SAM), as v1 concatenates."""

    def __init__(self, attn: str = "sdpa"):
        super().__init__()
        from transformers.models.clip.configuration_clip import CLIPVisionConfig
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
        from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder

        sam_cfg = DeepseekOcr2SamVisionConfig(**SAM, downsample_channels=[32, 64])
        sam_cfg._attn_implementation = attn
        self.sam_encoder = DeepseekOcr2SamVisionEncoder(sam_cfg)
        clip_cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        clip_cfg._attn_implementation = attn
        self.clip_encoder = V1PortClip(clip_cfg, grid=2)

    def forward(self, pixels):
        sam = self.sam_encoder(pixels).last_hidden_state
        clip = self.clip_encoder(sam)
        return torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)


class V1Port(nn.Module):
    def __init__(self, attn: str = "sdpa"):
        super().__init__()
        self.vision_tower = V1PortVisionTower(attn)
        self.multi_modal_projector = nn.Linear(128, 24)

    def forward(self, pixels):
        return self.multi_modal_projector(self.vision_tower(pixels))


def v1_port(attn: str = "sdpa", seed: int = 0):
    return randomise(V1Port(attn), seed)


def fused_varlen_refusal(heads: int, kv_heads: int, d: int, prefix: bool, backend: str = "triton-interpret") -> str | None:
    """Why the fused varlen backend would refuse a call of this shape (None: it runs it): the
    prefix-LM / GQA arguments are accepted once the varlen-v2 kernels land."""
    from deepencoder_kernels import dispatch

    q, k = torch.zeros(4, heads, d), torch.zeros(4, kv_heads, d)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    p = torch.tensor([2], dtype=torch.int32) if prefix else None
    args = (q, k, k, cu, 4, None, None, None, None, 0, p, None, None)
    b = next(b for b in dispatch.backends_of("varlen_attention") if b.name == backend)
    reasons = b.reasons(q.device, q.dtype, args)
    return "; ".join(reasons) or None
