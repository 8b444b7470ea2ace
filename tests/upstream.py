"""Stand-ins written to upstream DeepEncoder's *structure* (attribute names, call contracts and the
order of operations in ``sam_vary_sdpa.py`` / ``clip_sdpa.py``), independent of the package's
reference: windowed blocks pad the normed grid with zeros *before* the attention module's own qkv
Linear, attention runs per window, rel-pos is the two-einsum decomposition. They are the second
witness the reference is checked against, and the modules ``accelerate()`` must recognise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def upstream_get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        dtype = rel_pos.dtype
        resized = F.interpolate(rel_pos.to(torch.float32).reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        rel_pos_resized = resized.reshape(-1, max_rel_dist).permute(1, 0).to(dtype)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative.long()]


class UpstreamAttention(nn.Module):
    """SAM ``Attention``: qkv, proj, rel_pos_h/w, num_heads; input [B, H, W, C]."""

    def __init__(self, dim, num_heads, input_size):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = True
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, dim // num_heads))

    def forward(self, x):
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        Rh = upstream_get_rel_pos(H, H, self.rel_pos_h)
        Rw = upstream_get_rel_pos(W, W, self.rel_pos_w)
        r_q = q.reshape(B * self.num_heads, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).unsqueeze(-1).reshape(B * self.num_heads, H * W, H, 1)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).unsqueeze(-2).reshape(B * self.num_heads, H * W, 1, W)
        q, k, v = (t.view(B, self.num_heads, H * W, -1) for t in (q, k, v))
        bias = (rel_h + rel_w).view(B, self.num_heads, H * W, H * W)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def upstream_window_partition(x, ws):
    B, H, W, C = x.shape
    pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C), (Hp, Wp)


def upstream_window_unpartition(windows, ws, pad_hw, hw):
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // ws // ws)
    x = windows.view(B, Hp // ws, Wp // ws, ws, ws, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous()


class UpstreamMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class UpstreamBlock(nn.Module):
    """SAM ``Block``: norm1, attn, norm2, mlp, window_size."""

    def __init__(self, dim, num_heads, window_size, input_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = UpstreamAttention(dim, num_heads, input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = UpstreamMLP(dim, 4 * dim)
        self.window_size = window_size

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = upstream_window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = upstream_window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class UpstreamLayerNorm2d(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class UpstreamCompressor(nn.Module):
    """The tail of SAM's ``ImageEncoderViT``: neck, net_2, net_3 on NCHW."""

    def __init__(self, cin, cn, c2, c3):
        super().__init__()
        self.neck = nn.Sequential(nn.Conv2d(cin, cn, 1, bias=False), UpstreamLayerNorm2d(cn),
                                  nn.Conv2d(cn, cn, 3, padding=1, bias=False), UpstreamLayerNorm2d(cn))
        self.net_2 = nn.Conv2d(cn, c2, 3, 2, 1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, 3, 2, 1, bias=False)

    def forward(self, x_nhwc):
        return self.net_3(self.net_2(self.neck(x_nhwc.permute(0, 3, 1, 2))))


class UpstreamClipAttention(nn.Module):
    """CLIP ``NoTPAttention``-shaped: fused qkv_proj, out_proj, SDPA without a mask."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class UpstreamPatchEmbed(nn.Module):
    def __init__(self, dim, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


def upstream_get_abs_pos(pos, size):
    if pos.shape[1] == size:
        return pos
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic", antialias=True,
                            align_corners=False)
    return resized.to(pos.dtype).permute(0, 2, 3, 1)


class UpstreamImageEncoderViT(nn.Module):
    """SAM ``ImageEncoderViT``: patch_embed, pos_embed, blocks, neck, net_2, net_3 -> NCHW [B, C3, h, w]."""

    def __init__(self, dim=64, depth=3, num_heads=1, window_size=4, global_blocks=(1,), pos_grid=8, cn=16, c3=32):
        super().__init__()
        self.patch_embed = UpstreamPatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid, pos_grid, dim))
        self.blocks = nn.ModuleList(
            UpstreamBlock(dim, num_heads, 0 if i in global_blocks else window_size, (pos_grid, pos_grid)) for i in range(depth))
        tail = UpstreamCompressor(dim, cn, c3 // 2, c3)
        self.neck, self.net_2, self.net_3 = tail.neck, tail.net_2, tail.net_3

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + upstream_get_abs_pos(self.pos_embed, x.shape[1])
        for blk in self.blocks:
            x = blk(x)
        return self.net_3(self.net_2(self.neck(x.permute(0, 3, 1, 2))))


class UpstreamClipLayer(nn.Module):
    def __init__(self, dim, num_heads, attention=None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = attention or UpstreamClipAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class UpstreamClip(nn.Module):
    """``vision_model(pixels, sam_features)``: CLS + positions over SAM's grid, then the layers."""

    def __init__(self, dim=32, depth=2, num_heads=2, attention=None):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.position_embedding = nn.Parameter(torch.zeros(17, dim))   # 4 x 4 grid + CLS
        self.layers = nn.ModuleList(UpstreamClipLayer(dim, num_heads, attention and attention(dim, num_heads))
                                    for _ in range(depth))

    def forward(self, pixels, sam_features):
        x = sam_features.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.position_embedding[: x.shape[1] + 1]
        for layer in self.layers:
            x = layer(x)
        return x


class UpstreamProjector(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.layers = nn.Linear(cin, cout)

    def forward(self, x):
        return self.layers(x)


class UpstreamDeepEncoder(nn.Module):
    """The vision half of DeepSeek-OCR's model glue: sam_model, vision_model, projector."""

    def __init__(self, clip_attention=None, sam_attention=None):
        super().__init__()
        self.sam_model = UpstreamImageEncoderViT()
        if sam_attention is not None:
            for blk in self.sam_model.blocks:
                old = blk.attn
                side = (old.rel_pos_h.shape[0] + 1) // 2
                blk.attn = sam_attention(old.qkv.in_features, old.num_heads, (side, side))
        self.vision_model = UpstreamClip(attention=clip_attention)
        self.projector = UpstreamProjector(64, 24)

    def forward(self, pixels):
        sam = self.sam_model(pixels)
        clip = self.vision_model(pixels, sam)
        return self.projector(torch.cat([clip[:, 1:], sam.flatten(2).permute(0, 2, 1)], dim=-1))


# ---- vLLM-shaped variants: a SAM ``RelPosAttention`` and a CLIP attention on parallel linears ----


class RelPosAttention(UpstreamAttention):
    """vLLM's name for SAM's attention; same attributes and math."""


class ParallelLinear(nn.Linear):
    """vLLM's Column/RowParallelLinear contract on one GPU: returns (output, output_bias)."""

    def forward(self, x):
        return super().forward(x), None


class VllmClipAttention(nn.Module):
    """vLLM CLIPAttention-shaped: qkv_proj / out_proj return tuples; heads per partition; scale."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads_per_partition = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = ParallelLinear(dim, 3 * dim)
        self.out_proj = ParallelLinear(dim, dim)

    def forward(self, hidden_states):
        B, N, C = hidden_states.shape
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = (t.view(B, N, self.num_heads_per_partition, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out, _ = self.out_proj(out.transpose(1, 2).reshape(B, N, C))
        return out


# ---- DeepSeek-OCR 2 (DeepEncoder V2): the causal-flow stage as DeepSeek's and vLLM's code build it ----
#
# Written from the facts in shared/reference/deepencoder-v2.md (``V/deepencoderv2/qwen2_d2e.py`` and vLLM's
# port): ``qwen2_model`` (Qwen2Decoder2Encoder) holds ``query_768`` / ``query_1024`` (nn.Embedding, the bank
# whose size equals the image-token count is used) and ``model`` (CustomQwen2Decoder), whose ``model`` is a
# subclass of transformers' ``Qwen2Model`` (``embed_tokens`` deleted). The sequence is [n image tokens;
# n queries], token_type_ids 0 / 1; the intended mask is prefix-LM (image rows see every image column,
# query row i every image column and the queries up to i), additive, finfo.min where masked. DeepSeek's
# own code installs that mask by overriding ``_update_causal_mask``, which transformers >= 4.53 never
# calls (its image tokens then attend causally); vLLM's port passes ``attention_mask={"full_attention":
# mask}``, which transformers uses as it is. The banks here are small (the real ones hold 144 and 256).


def prefix_lm_mask(token_type_ids: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """[B, 1, L, L] additive mask from token_type_ids (0 = image, bidirectional; 1 = query, causal)."""
    t = token_type_ids.to(device)
    L = t.shape[1]
    i = torch.arange(L, device=device)
    image_col = (t == 0)[:, None, :]                                    # every row sees the image tokens...
    image_row = (t == 0)[:, :, None]
    causal_query = (t == 1)[:, :, None] & (t == 1)[:, None, :] & (i[None, None, :] <= i[None, :, None])
    allowed = (image_col & (image_row | (t == 1)[:, :, None])) | causal_query   # ...queries also the earlier queries
    mask = torch.full((t.shape[0], L, L), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.masked_fill(allowed, 0.0).unsqueeze(1)


def _qwen2_config(hidden, layers, heads, kv_heads, intermediate):
    import transformers

    return transformers.Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=4096,
                                    vocab_size=32, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_dropout=0.0,
                                    hidden_act="silu", _attn_implementation="sdpa")


def _deepseek_inner_class():
    """DeepSeek's CustomQwen2ModelInner: keeps token_type_ids for its ``_update_causal_mask`` override."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    class DeepseekQwen2Inner(Qwen2Model):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                    token_type_ids=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                    return_dict=None, cache_position=None):
            self._current_token_type_ids = token_type_ids
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, return_dict=return_dict)

        def _update_causal_mask(self, attention_mask, input_tensor, cache_position, past_key_values, output_attentions):
            return prefix_lm_mask(self._current_token_type_ids, input_tensor.dtype, input_tensor.device)

    return DeepseekQwen2Inner


def _vllm_inner_class():
    """vLLM's port: builds the mask itself and passes it as the full_attention entry of a mask mapping."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    class VllmQwen2Inner(Qwen2Model):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                    token_type_ids=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                    return_dict=None, cache_position=None):
            mask = prefix_lm_mask(token_type_ids, inputs_embeds.dtype, inputs_embeds.device)
            return super().forward(input_ids=input_ids, attention_mask={"full_attention": mask, "sliding_attention": mask},
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict)

    return VllmQwen2Inner


class CustomQwen2Decoder(nn.Module):
    def __init__(self, inner_cls, hidden, layers, heads, kv_heads, intermediate):
        super().__init__()
        self.model = inner_cls(_qwen2_config(hidden, layers, heads, kv_heads, intermediate))
        del self.model.embed_tokens

    def forward(self, inputs_embeds, token_type_ids, attention_mask=None, **kwargs):
        return self.model(inputs_embeds=inputs_embeds, token_type_ids=token_type_ids, attention_mask=attention_mask, **kwargs)


class Qwen2Decoder2Encoder(nn.Module):
    """``qwen2_model``: SAM's net_3 output [B, C, h, w] -> the n query outputs [B, n, C]."""

    def __init__(self, variant="deepseek", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, banks=(4, 9)):
        super().__init__()
        inner = _deepseek_inner_class() if variant == "deepseek" else _vllm_inner_class()
        self.model = CustomQwen2Decoder(inner, hidden, layers, heads, kv_heads, intermediate)
        self.query_768 = nn.Embedding(banks[0], hidden)
        self.query_1024 = nn.Embedding(banks[1], hidden)

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)
        bs, n, _ = x.shape
        if n == self.query_768.num_embeddings:
            bank = self.query_768.weight
        elif n == self.query_1024.num_embeddings:
            bank = self.query_1024.weight
        else:
            raise ValueError(f"no query bank for {n} tokens")
        combined = torch.cat([x, bank.unsqueeze(0).expand(bs, -1, -1)], dim=1)
        token_type_ids = torch.cat([torch.zeros(bs, n, dtype=torch.long), torch.ones(bs, n, dtype=torch.long)], dim=1)   # on the CPU, as upstream
        y = self.model(combined, token_type_ids)[0]
        return y[:, n:]


class UpstreamDeepEncoderV2(nn.Module):
    """DeepSeek-OCR 2's vision half: sam_model (net_3 to the decoder width), qwen2_model, projector."""

    def __init__(self, variant="deepseek", hidden=64, out=24):
        super().__init__()
        self.sam_model = UpstreamImageEncoderViT(c3=hidden)
        self.qwen2_model = Qwen2Decoder2Encoder(variant, hidden)
        self.projector = UpstreamProjector(hidden, out)

    def forward(self, pixels):
        return self.projector(self.qwen2_model(self.sam_model(pixels)))
