"""Route existing DeepEncoder code through this package's ops, in place and reversibly.

``accelerate(model)`` walks any ``nn.Module`` and recognises DeepEncoder parts by their structure,
never by class name:

- a **SAM block**: children ``norm1``, ``attn``, ``norm2``, ``mlp`` and a ``window_size``, whose
  ``attn`` has ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w`` and ``num_heads`` (DeepSeek's
  ``Block``/``Attention``, vLLM's block with ``RelPosAttention``). Window partition, padding, the
  dense bias and unpartition are replaced by one ``rel_pos_attention`` call on the qkv output;
- a **SAM encoder**: ``patch_embed``, ``pos_embed``, ``blocks``, ``neck``, ``net_2``, ``net_3``;
  its neck + compressor become one ``compress`` call on the trunk's channels-last output;
- a **CLIP attention**: ``qkv_proj`` and ``out_proj`` with a head count (``num_heads`` or
  vLLM's ``num_heads_per_partition``), on ``[B, N, C]``: ``varlen_attention`` over equal lengths;
- the **projector** (``projector.layers``, one Linear) is recognised and left alone: it is one GEMM.

Patching sets an instance-level ``forward`` that uses the module's own parameters: nothing is
copied, ``state_dict()`` keys and values are unchanged, loading a checkpoint afterwards works, and
``restore(model)`` (or leaving ``with accelerated(model):``) removes every patch.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import config as cfg
from . import ops
from .modules.sam import CompressorParts, resize_abs_pos

_ORIGINAL = "_deepencoder_kernels_patched"   # marks a patched module (holds the kind)


@dataclass
class AccelerationReport:
    patched: list[tuple[str, str]] = field(default_factory=list)            # (module path, kind)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)    # (module path, kind, why)

    def __str__(self) -> str:
        lines = [f"patched {len(self.patched)} module(s):"] + [f"  {p or '<root>'}: {k}" for p, k in self.patched]
        if self.left_alone:
            lines += [f"recognised, left alone ({len(self.left_alone)}):"]
            lines += [f"  {p or '<root>'}: {k}: {why}" for p, k, why in self.left_alone]
        return "\n".join(lines)

    def count(self, kind: str) -> int:
        return sum(1 for _, k in self.patched if k == kind)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call a projection; vLLM's parallel linears return (output, bias)."""
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def _has(module: nn.Module, *names: str) -> bool:
    return all(hasattr(module, n) for n in names)


# ---- fused forwards (bound to the module they patch) -----------------------------------------


def _sam_block_forward(self, x):
    attn = self.attn
    qkv = _linear(attn.qkv, self.norm1(x))
    pad_kv = getattr(attn.qkv, "bias", None)   # upstream pads before qkv: padded tokens are its bias
    out = ops.rel_pos_attention(qkv, attn.rel_pos_h, attn.rel_pos_w, attn.num_heads, int(self.window_size), pad_kv)
    x = x + _linear(attn.proj, out)
    return x + self.mlp(self.norm2(x))


def _sam_encoder_forward(self, x):
    x = self.patch_embed(x)
    if self.pos_embed is not None:
        x = x + resize_abs_pos(self.pos_embed, x.shape[1])
    for blk in self.blocks:
        x = blk(x)
    tokens = CompressorParts.compress(self, x)   # the same neck / net_2 / net_3 attribute layout
    h, w = cfg.compressed_side(x.shape[1]), cfg.compressed_side(x.shape[2])
    return tokens.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)   # upstream's [B, 1024, h, w] (a channels-last view)


def _clip_attention_forward(self, x, *args, **kwargs):
    B, N, C = x.shape
    heads = _clip_heads(self)
    qkv = _linear(self.qkv_proj, x).reshape(B * N, 3, heads, C // heads)
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=x.device)
    out = ops.varlen_attention(q, k, v, cu, N, getattr(self, "scale", None), check_values=False)
    return _linear(self.out_proj, out.reshape(B, N, C))


def _clip_heads(module) -> int:
    return int(getattr(module, "num_heads", None) or getattr(module, "num_heads_per_partition"))


# ---- recognition ------------------------------------------------------------------------------


def _classify(module: nn.Module) -> tuple[str | None, str | None]:
    """(kind, reason to leave it alone) for a DeepEncoder part; (None, None) for anything else."""
    if _has(module, "norm1", "attn", "norm2", "mlp", "window_size") and _has(module.attn, "qkv", "proj", "rel_pos_h", "rel_pos_w", "num_heads"):
        if not getattr(module.attn, "use_rel_pos", True):
            return "sam block", "its attention has use_rel_pos=False"
        d = module.attn.rel_pos_h.shape[-1]
        if module.attn.rel_pos_w.shape[-1] != d:
            return "sam block", "rel_pos_h and rel_pos_w have different head dims"
        return "sam block", None
    if _has(module, "qkv", "proj", "rel_pos_h", "rel_pos_w", "num_heads"):
        return "sam attention", "patched through its block (the block holds the window size and padding)"
    if _has(module, "patch_embed", "pos_embed", "blocks", "neck", "net_2", "net_3"):
        neck = module.neck
        if not (isinstance(neck, nn.Sequential) and len(neck) == 4 and hasattr(neck[1], "eps")):
            return "sam encoder", "neck is not (conv1x1, LayerNorm2d, conv3x3, LayerNorm2d)"
        return "sam encoder", None
    if _has(module, "qkv_proj", "out_proj") and (hasattr(module, "num_heads") or hasattr(module, "num_heads_per_partition")):
        return "clip attention", None
    if hasattr(module, "projector") and _has(module.projector, "layers"):
        return "projector", "one Linear: already a single GEMM, nothing to fuse"
    return None, None


_FORWARDS = {"sam block": _sam_block_forward, "sam encoder": _sam_encoder_forward, "clip attention": _clip_attention_forward}


def accelerate(model: nn.Module) -> AccelerationReport:
    """Patch every recognised DeepEncoder part of ``model`` in place; returns what was done and why not."""
    from .modules import encoder as own_encoder, sam as own_sam, clip as own_clip

    own = (own_sam.SamBlock, own_sam.SamEncoder, own_clip.ClipAttention, own_encoder.DeepEncoder)
    report = AccelerationReport()
    covered: set[int] = set()   # attentions whose block was recognised: reported with the block
    for path, module in model.named_modules():
        kind, why = _classify(module)
        if kind is None or id(module) in covered:
            continue
        if kind == "sam block":
            covered.add(id(module.attn))
        if kind == "projector":
            report.left_alone.append((f"{path}.projector" if path else "projector", kind, why))
            continue
        if isinstance(module, own):
            report.left_alone.append((path, kind, "a deepencoder_kernels module: already on the package's ops"))
            continue
        if why:
            report.left_alone.append((path, kind, why))
            continue
        if _ORIGINAL in module.__dict__:
            report.left_alone.append((path, kind, "already accelerated"))
            continue
        module.__dict__[_ORIGINAL] = kind
        module.forward = types.MethodType(_FORWARDS[kind], module)
        report.patched.append((path, kind))
    return report


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`; returns how many modules were restored."""
    n = 0
    for module in model.modules():
        if module.__dict__.pop(_ORIGINAL, None) is not None:
            module.__dict__.pop("forward", None)
            n += 1
    return n


@contextlib.contextmanager
def accelerated(model: nn.Module):
    """``with accelerated(model) as report:`` runs the block on the package's ops, then restores."""
    report = accelerate(model)
    try:
        yield report
    finally:
        restore(model)
