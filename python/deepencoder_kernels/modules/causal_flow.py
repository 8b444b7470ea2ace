"""DeepEncoder V2's causal-flow stage: a Qwen2-0.5B-shaped "decoder as encoder" over
[n image tokens; n learned queries] under a prefix-LM mask, returning the queries (``qwen2_model.*``).

Reproduces DeepSeek-OCR 2's ``deepencoderv2/qwen2_d2e.py`` as it runs with the transformers version it
pins (4.46.3), where its mask hook is called: image tokens attend to each other (bidirectional), query
i to every image token and to queries up to i (causal). Per layer: RMSNorm (fp32 variance), attention
with q/k/v bias and no o bias, GQA 14/2, RoPE (theta 1e6, rotate-half, positions 0..2n-1), SiLU-gated
MLP; a final RMSNorm. Every view of a batch (any mix of 144- and 256-token views) is one packed token
stream: each layer runs its Linears once over all of them and the attention as one
``ops.varlen_attention`` call (``prefix_lens`` = n, no mask tensor).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as cfg
from .. import ops
from ..reference import rope_tables
from .packing import Packing


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: variance in fp32, normalised x cast back to the input dtype, then x weight."""

    def __init__(self, dim: int, eps: float = cfg.CAUSAL_FLOW_RMS_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class CausalFlowAttention(nn.Module):
    """``self_attn``: q/k/v projections (with bias; k/v to the kv heads), prefix-LM GQA attention with
    RoPE in one packed op call, ``o_proj`` (no bias)."""

    def __init__(self, dim: int = cfg.CAUSAL_FLOW_DIM, num_heads: int = cfg.CAUSAL_FLOW_HEADS,
                 num_kv_heads: int = cfg.CAUSAL_FLOW_KV_HEADS, head_dim: int = cfg.HEAD_DIM):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, x, packing: Packing, rope: tuple[torch.Tensor, torch.Tensor]):
        """x packed ``[total, dim]``; ``rope`` = (cos, sin) ``[max_seqlen, head_dim]``."""
        total = x.shape[0]
        q = self.q_proj(x).view(total, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(total, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(total, self.num_kv_heads, self.head_dim)
        out = ops.varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, prefix_lens=packing.prefix_lens,
                                   rope_cos=rope[0], rope_sin=rope[1], check_values=False)
        return self.o_proj(out.reshape(total, -1))


class CausalFlowMLP(nn.Module):
    def __init__(self, dim: int = cfg.CAUSAL_FLOW_DIM, hidden: int = cfg.CAUSAL_FLOW_MLP_DIM):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CausalFlowLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.self_attn = CausalFlowAttention(dim, num_heads, num_kv_heads, head_dim)
        self.mlp = CausalFlowMLP(dim, hidden)
        self.input_layernorm = RMSNorm(dim)
        self.post_attention_layernorm = RMSNorm(dim)

    def forward(self, x, packing: Packing, rope):
        x = x + self.self_attn(self.input_layernorm(x), packing, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalFlowDecoder(nn.Module):
    """The Qwen2 stack (``layers``, final ``norm``) at upstream's ``qwen2_model.model.model``."""

    def __init__(self, dim: int, depth: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(CausalFlowLayer(dim, num_heads, num_kv_heads, head_dim, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x, packing: Packing, rope):
        for layer in self.layers:
            x = layer(x, packing, rope)
        return self.norm(x)


class _Qwen2Holder(nn.Module):
    """Upstream's ``CustomQwen2Decoder`` holds transformers' ``Qwen2Model`` as ``.model``: one level
    kept only so the checkpoint names (``qwen2_model.model.model.layers.*``) map one to one."""

    def __init__(self, decoder: CausalFlowDecoder):
        super().__init__()
        self.model = decoder


class CausalFlowEncoder(nn.Module):
    """``qwen2_model``: compressed image tokens ``[B, n, 896]`` (n = 144 or 256) -> the outputs of its n
    learned queries ``[B, n, 896]``, in their causal order.

    The width/depth arguments exist so tests can build small models with the same code paths.
    """

    def __init__(self, dim: int = cfg.CAUSAL_FLOW_DIM, depth: int = cfg.CAUSAL_FLOW_DEPTH,
                 num_heads: int = cfg.CAUSAL_FLOW_HEADS, num_kv_heads: int = cfg.CAUSAL_FLOW_KV_HEADS,
                 head_dim: int = cfg.HEAD_DIM, hidden: int = cfg.CAUSAL_FLOW_MLP_DIM,
                 rope_theta: float = cfg.CAUSAL_FLOW_ROPE_THETA):
        super().__init__()
        self.model = _Qwen2Holder(CausalFlowDecoder(dim, depth, num_heads, num_kv_heads, head_dim, hidden))
        for n, name in cfg.QUERY_BANKS.items():
            setattr(self, name, nn.Embedding(n, dim))
        self.head_dim, self.rope_theta = head_dim, rope_theta

    @property
    def decoder(self) -> CausalFlowDecoder:
        return self.model.model

    def queries(self, n: int) -> torch.Tensor:
        """The learned query bank for ``n`` image tokens ([n, dim]): ``query_768`` for 144, ``query_1024`` for 256."""
        if n not in cfg.QUERY_BANKS:
            raise ValueError(f"DeepEncoder V2 has learned queries for 144 (768 px) or 256 (1024 px) image tokens, "
                             f"got {n}: views must be 768 or 1024 px")
        return getattr(self, cfg.QUERY_BANKS[n]).weight

    def rope(self, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0..length-1, made in fp32 and cast to the activation dtype as Qwen2's
        rotary embedding returns them (small: recomputed per call, nothing cached to go stale)."""
        return rope_tables(length, self.head_dim, self.rope_theta, dtype, device)

    def from_token_groups(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of several sizes at once (``groups[g]``: ``[B_g, n_g, dim]`` image tokens): one packed
        pass, each view the sequence [its n_g tokens; the n_g queries]. Returns ``[B_g, n_g, dim]`` each."""
        dim = groups[0].shape[-1]
        seqs, prefixes = [], []
        for tokens in groups:
            B, n, _ = tokens.shape
            queries = self.queries(n).to(tokens.dtype).expand(B, n, dim)
            seqs.append(torch.cat([tokens, queries], dim=1).reshape(B * 2 * n, dim))
            prefixes += [n] * B
        packing = Packing.of_prefix_lm(prefixes, groups[0].device)
        x = torch.cat(seqs) if len(seqs) > 1 else seqs[0]
        out = self.decoder(x, packing, self.rope(packing.max_seqlen, x.dtype, x.device))
        parts = out.split([t.shape[0] * 2 * t.shape[1] for t in groups])
        return [part.view(t.shape[0], 2, t.shape[1], dim)[:, 1] for part, t in zip(parts, groups)]

    def forward(self, tokens):
        """Upstream's call: ``[B, n, dim]`` image tokens of equal-size views -> ``[B, n, dim]`` query outputs."""
        return self.from_token_groups([tokens])[0]
