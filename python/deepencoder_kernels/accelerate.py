"""Route existing DeepEncoder code through this package's ops, in place and reversibly.

``accelerate(model)`` walks any ``nn.Module`` and recognises DeepEncoder parts by their structure,
never by class name:

- a **SAM block**: children ``norm1``, ``attn``, ``norm2``, ``mlp`` and a ``window_size``, whose
  ``attn`` has ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w`` and ``num_heads`` (DeepSeek's
  ``Block``/``Attention``, vLLM's block with ``RelPosAttention``). Window partition, padding, the
  dense bias and unpartition are replaced by one ``rel_pos_attention`` call on the qkv output;
- a **SAM encoder**: ``patch_embed``, ``pos_embed``, ``blocks``, ``neck``, ``net_2``, ``net_3``;
  its neck + compressor become one ``compress`` call on the trunk's channels-last output;
- a **CLIP attention**: ``qkv_proj`` and ``out_proj`` with a head count, on ``[B, N, C]``:
  ``varlen_attention`` over equal lengths. Under vLLM's tensor parallelism ``qkv_proj`` (a
  ``QKVParallelLinear``) yields only this rank's heads (``num_heads_per_partition``): attention
  runs on those, and ``out_proj`` (a ``RowParallelLinear``) does the all-reduce, as it does
  upstream. The patched forward returns what the module's own forward returns (vLLM's returns
  ``(output, None)``), read from its source; a module whose returns cannot be read is left alone;
- the **projector** (``projector.layers``, one Linear) is recognised and left alone: it is one GEMM.

Patching sets an instance-level ``forward`` that uses the module's own parameters: nothing is
copied, ``state_dict()`` keys and values are unchanged, loading a checkpoint afterwards works, and
``restore(model)`` (or leaving ``with accelerated(model):``) removes every patch.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import config as cfg
from . import ops
from .modules.sam import CompressorParts, resize_abs_pos

_ORIGINAL = "_deepencoder_kernels_patched"   # marks a patched module (holds the kind)
_RETURNS = "_deepencoder_kernels_returns"    # a patched CLIP attention: how many values its forward returns


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


def _clip_attention_forward(self, hidden_states=None, *args, x=None, **kwargs):
    x = hidden_states if hidden_states is not None else x   # vLLM and HF pass hidden_states=, DeepSeek x
    B, N, _ = x.shape
    heads = _clip_heads(self)
    qkv = _linear(self.qkv_proj, x)                  # [B, N, 3 * heads * d]: this rank's heads only under TP
    d = qkv.shape[-1] // (3 * heads)
    q, k, v = qkv.reshape(B * N, 3, heads, d).unbind(1)
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=x.device)   # shapes only: no host sync
    out = ops.varlen_attention(q, k, v, cu, N, getattr(self, "scale", None), check_values=False)
    out = _linear(self.out_proj, out.reshape(B, N, heads * d))   # a RowParallelLinear all-reduces here
    returns = self.__dict__[_RETURNS]
    return out if returns == 1 else (out,) + (None,) * (returns - 1)


def _clip_heads(module) -> int:
    """Heads this module computes: vLLM's per-partition count (tensor parallelism), DeepSeek's
    ``n_local_heads``, else ``num_heads`` (which is the *total* in vLLM)."""
    for name in ("num_heads_per_partition", "n_local_heads", "num_heads"):
        if getattr(module, name, None):
            return int(getattr(module, name))
    raise AttributeError("no head count")


def _returned_values(module: nn.Module) -> int | None:
    """How many values ``type(module).forward`` returns: 1 (a tensor) or n for ``return out, None, ...``
    (extras literally None); None when its source cannot be read or its returns disagree."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    counts = set()
    todo = list(ast.iter_child_nodes(tree.body[0]))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue   # returns of nested functions are not the forward's
        if isinstance(node, ast.Return):
            value = node.value
            if isinstance(value, ast.Tuple):
                extras_none = all(isinstance(e, ast.Constant) and e.value is None for e in value.elts[1:])
                counts.add(len(value.elts) if extras_none else None)
            else:
                counts.add(1 if value is not None else None)
        todo.extend(ast.iter_child_nodes(node))
    return counts.pop() if len(counts) == 1 else None


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
        try:
            heads = _clip_heads(module)
        except AttributeError:
            return "clip attention", "its head count is not set"
        width = getattr(getattr(module.qkv_proj, "weight", None), "shape", (None,))[0]
        if width is not None and width % (3 * heads):
            return "clip attention", f"qkv_proj's {width} outputs do not split into q, k, v of {heads} heads"
        if _returned_values(module) is None:
            return "clip attention", "cannot tell from its forward's source what it returns"
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
        if kind == "clip attention":
            module.__dict__[_RETURNS] = _returned_values(module)
        module.forward = types.MethodType(_FORWARDS[kind], module)
        report.patched.append((path, kind))
    return report


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`; returns how many modules were restored."""
    n = 0
    for module in model.modules():
        if module.__dict__.pop(_ORIGINAL, None) is not None:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_RETURNS, None)
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
