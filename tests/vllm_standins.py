"""Stand-ins for upstream vLLM's DeepSeek-OCR and DeepSeek-OCR 2 models, written to the *structure* of its public
``vllm/model_executor/models/deepseek_ocr.py``, ``deepencoder.py`` and ``clip.py`` (and, for DeepSeek-OCR 2,
``deepseek_ocr2.py`` + ``deepencoder2.py``: ``sam_model`` with net_3 to the decoder width, ``qwen2_model``
as DeepSeek's ``qwen2_d2e.py`` builds it with vLLM's mask mapping, ``projector``, ``view_seperator``, all
replicated on every rank; see ``upstream.Qwen2Decoder2Encoder``): the same module
tree and parameter names (``sam_model.blocks.N.attn.qkv``, ``vision_model.transformer.layers.N.
self_attn.qkv_proj``, ...), the same call contracts (CLIPAttention returns ``(output, None)``, the
parallel linears return ``(output, bias)``), and tensor parallelism as vLLM shards CLIP:
``qkv_proj`` (QKVParallelLinear) holds this rank's q, k and v heads, ``out_proj`` / ``fc2``
(RowParallelLinear) take this rank's input slice, add the bias on rank 0 and all-reduce, ``fc1``
(ColumnParallelLinear) holds this rank's outputs. SAM is replicated. Ranks come from
``torch.distributed`` when it is initialised (gloo on CPU in the tests), else world size 1.

Sizes are small (SAM width 64, CLIP width 64 with 4 heads of 16) so the fused kernels run in
Triton's interpreter quickly; the code paths are the full model's.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from upstream import Qwen2Decoder2Encoder, RelPosAttention, UpstreamImageEncoderViT


def tp_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    param.data.copy_(loaded)


class _ParallelLinear(nn.Module):
    """Common part of vLLM's parallel linears: ``weight`` [out_local, in_local], optional ``bias``,
    a ``weight_loader`` on each parameter that takes the full checkpoint tensor."""

    def __init__(self, in_local: int, out_local: int, bias: bool, bias_size: int | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_world()
        self.weight = nn.Parameter(torch.empty(out_local, in_local))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(bias_size or out_local))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)


class ColumnParallelLinear(_ParallelLinear):
    def __init__(self, input_size: int, output_size: int, bias: bool = True):
        _, world = tp_rank_world()
        super().__init__(input_size, output_size // world, bias)

    def weight_loader(self, param, loaded):
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * n, n))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias), None


class QKVParallelLinear(_ParallelLinear):
    """Output ``[q_local | k_local | v_local]``, each ``heads_local * head_size`` wide."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, bias: bool = True):
        _, world = tp_rank_world()
        self.num_heads = total_num_heads // world
        self.head_size = head_size
        super().__init__(hidden_size, 3 * self.num_heads * head_size, bias)

    def weight_loader(self, param, loaded, shard_id: str | None = None):
        if shard_id is None:   # a fused checkpoint tensor (DeepSeek-OCR's): split into q, k, v first
            for sid, part in zip("qkv", loaded.chunk(3, dim=0)):
                self.weight_loader(param, part, sid)
            return
        width = self.num_heads * self.head_size
        src = loaded.narrow(0, self.tp_rank * width, width)
        param.data.narrow(0, "qkv".index(shard_id) * width, width).copy_(src)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias), None


class RowParallelLinear(_ParallelLinear):
    def __init__(self, input_size: int, output_size: int, bias: bool = True):
        _, world = tp_rank_world()
        super().__init__(input_size // world, output_size, bias, bias_size=output_size)

    def weight_loader(self, param, loaded):
        if param.dim() == 1:   # the bias is whole on every rank
            param.data.copy_(loaded)
            return
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * n, n))

    def forward(self, x):
        bias = self.bias if self.tp_rank == 0 else None   # added once, before the reduction
        out = F.linear(x, self.weight, bias)
        if self.tp_size > 1:
            dist.all_reduce(out)
        return out, None


class MMEncoderAttention(nn.Module):
    """q, k, v ``[B, N, heads * head_size]`` -> ``[B, N, heads * head_size]`` (no mask)."""

    def __init__(self, num_heads: int, head_size: int, scale: float):
        super().__init__()
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale

    def forward(self, query, key, value):
        B, N, _ = query.shape
        q, k, v = (t.view(B, N, self.num_heads, self.head_size).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(B, N, -1)


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.embed_dim = hidden_size
        self.num_heads = num_heads                       # the total, as in vLLM
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads)
        self.out_proj = RowParallelLinear(hidden_size, hidden_size)
        self.tp_size = tp_rank_world()[1]
        self.num_heads_per_partition = num_heads // self.tp_size
        self.attn = MMEncoderAttention(self.num_heads_per_partition, self.head_dim, self.scale)

    def forward(self, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.chunk(3, dim=-1)
        out, _ = self.out_proj(self.attn(q, k, v))
        return out, None


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.activation_fn = quick_gelu
        self.fc1 = ColumnParallelLinear(hidden_size, intermediate_size)
        self.fc2 = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x):
        x, _ = self.fc1(x)
        x, _ = self.fc2(self.activation_fn(x))
        return x


class CLIPEncoderLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.mlp = CLIPMLP(hidden_size, intermediate_size)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=1e-5)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states))
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(hidden_size, num_heads, intermediate_size) for _ in range(layers))

    def forward(self, inputs_embeds, return_all_hidden_states: bool):
        states = [inputs_embeds]
        for layer in self.layers:
            states.append(layer(states[-1]))
        return states if return_all_hidden_states else states[-1]


class DeepCLIPVisionEmbeddings(nn.Module):
    """CLS + SAM's compressed grid (``patch_embeds``), plus positions resized (bicubic, antialias)
    from the pretrained grid to this one."""

    def __init__(self, hidden_size: int, image_size: int, patch_size: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(hidden_size))
        self.patch_embedding = nn.Conv2d(3, hidden_size, patch_size, patch_size, bias=False)   # Conv2dLayer in vLLM
        self.num_positions = (image_size // patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, hidden_size)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def get_abs_pos(self, abs_pos, tgt_size: int):
        dim = abs_pos.size(-1)
        table = abs_pos.squeeze(0)
        cls_token, grid = table[:1], table[1:]
        src, tgt = int(math.sqrt(table.shape[0] - 1)), int(math.sqrt(tgt_size))
        if src == tgt:
            return abs_pos
        grid = grid.view(1, src, src, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", antialias=True, align_corners=False).to(abs_pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(tgt * tgt, dim)
        return torch.cat([cls_token, grid], dim=0).view(1, tgt * tgt + 1, dim)

    def forward(self, pixel_values, patch_embeds=None):
        if patch_embeds is None:
            patch_embeds = self.patch_embedding(pixel_values)
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.class_embedding.expand(pixel_values.shape[0], 1, -1), patch_embeds], dim=1)
        return embeddings + self.get_abs_pos(self.position_embedding(self.position_ids), embeddings.size(1))


class DeepCLIPVisionTransformer(nn.Module):
    def __init__(self, hidden_size=64, num_heads=4, intermediate_size=128, layers=2, image_size=56, patch_size=14):
        super().__init__()
        self.embeddings = DeepCLIPVisionEmbeddings(hidden_size, image_size, patch_size)
        self.pre_layrnorm = nn.LayerNorm(hidden_size, eps=1e-5)   # upstream's spelling (checkpoint names)
        self.transformer = CLIPEncoder(hidden_size, num_heads, intermediate_size, layers)

    def forward(self, pixel_values, patch_embeds=None, *, select_layers=None):
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, patch_embeds))
        return self.transformer(inputs_embeds=hidden_states, return_all_hidden_states=select_layers is not None)


class MlpProjector(nn.Module):
    """deepseek_vl2's projector with ``projector_type == "linear"``."""

    def __init__(self, input_dim: int, n_embed: int):
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embed)

    def forward(self, x):
        return self.layers(x)


class DecoyLanguageModel(nn.Module):
    """Stands for the language model: it holds an attention shaped like a CLIP one (``qkv_proj``,
    ``out_proj``, ``num_heads``) so a plugin that walked the whole model would patch it."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.attn = CLIPAttention(dim, 2)


def build_sam_vit_b_small():
    sam = UpstreamImageEncoderViT(c3=64)
    for blk in sam.blocks:   # vLLM's RelPosAttention: the same attributes and math as SAM's Attention
        side = (blk.attn.rel_pos_h.shape[0] + 1) // 2
        blk.attn = RelPosAttention(blk.attn.qkv.in_features, blk.attn.num_heads, (side, side))
    return sam


class DeepseekOCRForCausalLM(nn.Module):
    """``deepseek_ocr.DeepseekOCRForCausalLM``'s vision half and glue (one global view per image)."""

    def __init__(self, *, vllm_config=None, prefix: str = ""):
        super().__init__()
        self.sam_model = build_sam_vit_b_small()
        self.vision_model = DeepCLIPVisionTransformer()
        self.projector = MlpProjector(128, 24)
        self.image_newline = nn.Parameter(torch.randn(24))
        self.view_seperator = nn.Parameter(torch.randn(24))   # upstream's spelling
        self.language_model = DecoyLanguageModel()

    def _encode_global_features(self, image_tensor):
        global_features_1 = self.sam_model(image_tensor)
        global_features_2 = self.vision_model(image_tensor, global_features_1)
        features = torch.cat((global_features_2[:, 1:], global_features_1.flatten(2).permute(0, 2, 1)), dim=-1)
        return self.projector(features)

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


class DeepseekOCR2ForCausalLM(nn.Module):
    """``deepseek_ocr2.DeepseekOCR2ForCausalLM``'s vision half and glue (one global view per image):
    ``sam_model`` -> ``qwen2_model`` -> ``projector``; no CLIP, no newline tokens."""

    def __init__(self, *, vllm_config=None, prefix: str = ""):
        super().__init__()
        self.sam_model = build_sam_vit_b_small()                 # net_3 -> 64 = the decoder width here (896 upstream)
        self.qwen2_model = Qwen2Decoder2Encoder("vllm", hidden=64)
        self.projector = MlpProjector(64, 24)
        self.view_seperator = nn.Parameter(torch.randn(24))     # upstream's spelling
        self.language_model = DecoyLanguageModel()

    def _encode_global_features(self, image_tensor):
        features = self.projector(self.qwen2_model(self.sam_model(image_tensor)))
        return features.view(-1, features.shape[-1])

    load_weights = DeepseekOCRForCausalLM.load_weights


MODELS = {"DeepseekOCRForCausalLM": DeepseekOCRForCausalLM, "DeepseekOCR2ForCausalLM": DeepseekOCR2ForCausalLM}


def full_checkpoint(seed: int = 0, arch: str = "DeepseekOCRForCausalLM") -> dict[str, torch.Tensor]:
    """Unsharded weights with the checkpoint's names (``model.`` prefix, fused ``qkv_proj``); call
    it outside a process group (inside one, the model's parallel linears are shards)."""
    torch.manual_seed(seed)
    out = {}
    for name, p in MODELS[arch]().named_parameters():
        scale = 0.5 if ("rel_pos" in name or "pos" in name or "class" in name or "bias" in name) else 0.2
        out[f"model.{name}"] = torch.randn(p.shape) * scale
    return out


def tp_worker(rank: int, world: int, init_file: str, ckpt_path: str, pixels_path: str, out_dir: str, backends: tuple,
              arch: str = "DeepseekOCRForCausalLM"):
    """One tensor-parallel rank (``torch.multiprocessing.spawn`` target): load the full checkpoint
    into this rank's shards, run the original forward, accelerate the towers the way the vLLM
    plugin does, run it again on each backend; save everything for the parent to compare."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (by the package)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from deepencoder_kernels import backend, last_backends
        from deepencoder_kernels.vllm_plugin import accelerate_towers

        model = MODELS[arch]().eval()
        model.load_weights(torch.load(ckpt_path).items())
        pixels = torch.load(pixels_path)
        out = {"qkv_rows": model.vision_model.transformer.layers[0].self_attn.qkv_proj.weight.shape[0]} if hasattr(model, "vision_model") else {}
        with torch.no_grad():
            out["original"] = model._encode_global_features(pixels)
            report = accelerate_towers(model)
            out["patched"] = [(p.path, p.kind) for p in report.patched]   # plain tuples: torch.load(weights_only)
            for name in backends:
                with backend(name):
                    out[name] = model._encode_global_features(pixels)
                out[f"{name} ran"] = {op: c.backend for op, c in last_backends().items()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
