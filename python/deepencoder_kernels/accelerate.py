"""Route existing DeepEncoder code through this package's ops, in place and reversibly.

``accelerate(model)`` walks any ``nn.Module`` and recognises DeepEncoder parts by their structure,
never by class name, in every layout known: DeepSeek's own v1 / V2 code (``sam_vary_sdpa.py``,
``clip_sdpa.py``, ``qwen2_d2e.py``), vLLM's ports (``deepencoder.py``, ``deepencoder2.py``),
transformers' ``sam`` and ``deepseek_ocr2`` (and the v1 port's layout, the same names), timm's and
Meta's SAM:

- a **SAM block**: ``norm1``/``layer_norm1``, ``attn``, ``norm2``/``layer_norm2``, ``mlp`` and a
  ``window_size``, its ``attn`` holding ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w`` and a head
  count (``num_heads``/``num_attention_heads``). Window partition, padding, the dense bias and
  unpartition become one ``rel_pos_attention`` call on the qkv output;
- a **SAM encoder with its compressor**: a trunk (``patch_embed``, ``pos_embed``, ``blocks``/``layers``),
  a neck (DeepSeek's ``Sequential(conv1x1, LayerNorm2d, conv3x3, LayerNorm2d)`` or transformers'
  ``conv1``, ``layer_norm1``, ``conv2``, ``layer_norm2``) and the two stride-2 convs (``net_2``/``net_3``
  or ``proj.conv1``/``proj.conv2``, 1024 or V2's 896 out): neck + compressor become one ``compress``
  call on the trunk's channels-last output. transformers' encoder keeps its forward's decorators
  (output capturing, ``return_dict``): only the body under them changes;
- a **CLIP attention** with a fused ``qkv_proj`` (DeepSeek's, vLLM's; tensor-parallel shards
  included): ``varlen_attention`` over equal lengths, returning what the module's own forward
  returns (read from its source);
- DeepSeek-OCR 2's **causal-flow stage** (a decoder stack with query banks ``query_768`` /
  ``query_1024``): DeepSeek's and vLLM's ``qwen2_model`` run their transformers ``Qwen2Model``'s own
  layers with one prefix-LM GQA ``varlen_attention`` per layer (RoPE inside the op, no mask built,
  nothing read to the host); transformers' native ``vision_encoder`` keeps its code and routes its
  attention through transformers' ``AttentionInterface`` to the same op. Under transformers >= 4.53
  DeepSeek's own code never has its mask hook (``_update_causal_mask``) called, so its image tokens
  attend causally: the accelerated stage computes the intended prefix-LM attention, and the report
  says it corrected this;
- transformers-style attentions with separate ``q_proj``/``k_proj``/``v_proj`` inside DeepEncoder's
  CLIP (next to a SAM encoder with a compressor) go through the ``AttentionInterface`` too.

Mask decoders, prompt encoders, language models and projectors are never touched: the CLIP and
causal-flow recognisers need DeepEncoder context (a SAM sibling, query banks), and the report lists
every look-alike left alone with what was looked for and what was found.

Contracts kept: parameters are the module's own (nothing copied or cached: a weight written any
way, ``param.data`` included, is what the next call reads), ``state_dict()`` is unchanged, the
return types are the originals', and when transformers is asked for attention weights (its
output-capturing decorators are recording ``attentions``) the original code runs for that call.
``torch.compile(fullgraph=True)`` traces every patched forward.

Never slower: with the default backend choice (``auto``) a patched part runs its original forward
wherever the package has no path faster than the module's own code for its op on that device and
dtype (today: the CPU, where ``auto`` picks only the reference); ``dk.backend(...)`` forces the ops.
The one exception is a correction (DeepSeek's V2 code under transformers >= 4.53), which always
runs the op. ``restore(model)`` (or leaving ``with accelerated(model):``) undoes everything.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from . import config as cfg
from . import dispatch, ops
from .modules.sam import resize_abs_pos

_PATCH = "_deepencoder_kernels_patch"    # module.__dict__ key: what was changed on this module (for restore)
ATTN_IMPL = "deepencoder_kernels"        # the name registered in transformers' AttentionInterface
_PREFIX_KW = "deepencoder_kernels_prefix"   # kwarg carrying the prefix length down to the attention function


# ---- the report ------------------------------------------------------------------------------


class Patched(NamedTuple):
    path: str
    kind: str
    via: str                 # "forward", "forward (decorators kept)", "AttentionInterface", ...


class LeftAlone(NamedTuple):
    path: str
    kind: str
    why: str
    looked_for: str = ""     # for look-alikes: what a patchable part has
    found: str = ""          # and what this module has instead


@dataclass
class AccelerationReport:
    """What ``accelerate()`` did. Data (lists of named tuples) for code; ``print(report)`` for people."""

    patched: list[Patched] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    corrected: list[tuple[str, str]] = field(default_factory=list)   # (path, what the original did wrong)
    original_here: list[str] = field(default_factory=list)           # parts that keep their forward on this device

    def count(self, kind: str) -> int:
        return sum(1 for p in self.patched if p.kind == kind)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.patched:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.kinds().items()) or "nothing"
        lines = [f"deepencoder-kernels accelerate(): patched {len(self.patched)} module(s) ({counts}); "
                 f"{len(self.left_alone)} left alone"]
        lines += [f"  {p.path or '<root>'}: {p.kind} ({p.via})" for p in self.patched]
        if self.left_alone:
            lines.append("left alone:")
            for e in self.left_alone:
                lines.append(f"  {e.path or '<root>'}: {e.kind}: {e.why}")
                if e.looked_for:
                    lines.append(f"      looked for: {e.looked_for}")
                    lines.append(f"      found:      {e.found}")
        if self.corrected:
            lines.append("corrected:")
            lines += [f"  {p or '<root>'}: {what}" for p, what in self.corrected]
        if self.original_here:
            lines.append("never slower:")
            lines += [f"  {line}" for line in self.original_here]
        return "\n".join(lines)


# ---- small helpers ---------------------------------------------------------------------------


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call a projection; vLLM's parallel linears return (output, bias)."""
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def _attr(module: nn.Module, *names: str):
    """The first of ``names`` that ``module`` has (its name and value), else (None, None)."""
    for n in names:
        if hasattr(module, n):
            return n, getattr(module, n)
    return None, None


def _has(module, *names: str) -> bool:
    return all(hasattr(module, n) for n in names)


def _describe(module: nn.Module, names=None) -> str:
    """A short listing of a module's children / attributes, for "found:" lines."""
    kids = [f"{n}={type(c).__name__}" for n, c in module.named_children()]
    extra = [n for n in (names or ()) if hasattr(module, n) and n not in dict(module.named_children())]
    return f"{type(module).__name__}(" + ", ".join(kids + extra) + ")"


def _original(module: nn.Module):
    """The module's own forward, bound (the class's: instance patches are ours)."""
    return types.MethodType(type(module).forward, module)


def _first_param(module: nn.Module):
    return next(module.parameters(), None)


_FASTER: dict = {}


def _faster_backend(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The backend ``auto`` takes for ``op`` here when it is faster than the module's own code (a
    backend declares that with ``faster_than_upstream``: a bool, or a callable ``(device, dtype) ->
    bool``; without it: anything but the reference, which *is* upstream's math); None when there is none."""
    order = dispatch.AUTO_ORDER.get(device.type, ("reference",))
    registered = dispatch._REGISTRY.get(op, [])
    key = (op, device.type, dtype, order, id(registered), len(registered))   # changes when backends are (re)registered
    if key not in _FASTER:
        found = None
        for name in order:
            b = next((b for b in registered if b.name == name), None)
            if b is not None and not b.reasons(device, dtype):
                faster = getattr(b, "faster_than_upstream", b.name != "reference")
                found = b.name if (faster(device, dtype) if callable(faster) else faster) else None
                break
        _FASTER[key] = found
    return _FASTER[key]


def _fused_here(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a patched part runs the package's op for this call: always under ``dk.backend(kind)``
    (asked for), under ``auto`` only where a faster backend exists (never slower)."""
    if dispatch.requested_kind() != "auto":
        return True
    return _faster_backend(op, device, dtype) is not None


def _hf_recording(key: str) -> bool:
    """Whether transformers' output-capturing decorators are recording ``key`` ("attentions") in
    this call: then the original code runs, so the weights are the ones it would return."""
    oc = sys.modules.get("transformers.utils.output_capturing")
    var = getattr(oc, "_active_collector", None)
    if var is None:
        return False
    if torch.compiler.is_compiling() and not getattr(var, "compiling", False):
        return False   # no recording was opened inside this compiled region
    collected = var.get()
    return collected is not None and key in collected


# ---- SAM block -------------------------------------------------------------------------------

_NORM1, _NORM2, _HEADS = ("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("num_heads", "num_attention_heads")
_BLOCK_KNOWN = set(_NORM1 + _NORM2 + ("attn", "mlp"))
_ATTN_KNOWN = {"qkv", "proj"}


def _harmless(child: nn.Module) -> bool:
    """Children a fused forward may skip: identities and dropout that drops nothing."""
    return isinstance(child, nn.Identity) or (isinstance(child, nn.Dropout) and child.p == 0)


def _sam_block_check(block: nn.Module) -> tuple[str | None, str]:
    """(reason to leave it alone or None, found) for a module holding a SAM attention."""
    n1, _ = _attr(block, *_NORM1)
    n2, _ = _attr(block, *_NORM2)
    attn = block.attn
    heads_name, heads = _attr(attn, *_HEADS)
    found = _describe(block, ["window_size"])
    missing = [want for want, got in (("norm1|layer_norm1", n1), ("norm2|layer_norm2", n2), ("mlp", getattr(block, "mlp", None)),
                                      ("window_size", getattr(block, "window_size", None))) if got is None]
    missing += [f"attn.{n}" for n in ("qkv", "proj", "rel_pos_h", "rel_pos_w") if getattr(attn, n, None) is None]
    if heads is None:
        missing.append("attn.num_heads|num_attention_heads")
    if missing:
        return "not a SAM block: it lacks " + ", ".join(missing), found
    if not getattr(attn, "use_rel_pos", True):
        return "its attention has use_rel_pos=False", found
    if attn.rel_pos_h.dim() != 2 or attn.rel_pos_w.dim() != 2 or attn.rel_pos_h.shape[-1] != attn.rel_pos_w.shape[-1]:
        return "rel_pos_h and rel_pos_w are not [L, head_dim] tables of one head dim", found
    if not isinstance(block.window_size, int):
        return f"window_size is {type(block.window_size).__name__}, not an int", found
    extra = [f"{n}={type(c).__name__}" for n, c in block.named_children() if n not in _BLOCK_KNOWN and not _harmless(c)]
    extra += [f"attn.{n}={type(c).__name__}" for n, c in attn.named_children() if n not in _ATTN_KNOWN and not _harmless(c)]
    if extra:
        return "it has parts the fused block would skip: " + ", ".join(extra), found
    p = getattr(attn, "dropout", 0.0)
    if isinstance(p, (int, float)) and p > 0:
        return f"attention dropout {p} (the fused attention has none)", found
    return None, found


def _sam_block_body(self, x):
    attn = self.attn
    norm1 = self.layer_norm1 if hasattr(self, "layer_norm1") else self.norm1
    norm2 = self.layer_norm2 if hasattr(self, "layer_norm2") else self.norm2
    heads = attn.num_heads if hasattr(attn, "num_heads") else attn.num_attention_heads
    qkv = _linear(attn.qkv, norm1(x))
    pad_kv = getattr(attn.qkv, "bias", None)   # upstream pads before qkv: padded tokens are its bias
    out = ops.rel_pos_attention(qkv, attn.rel_pos_h, attn.rel_pos_w, int(heads), int(self.window_size), pad_kv)
    x = x + _linear(attn.proj, out)
    return x + self.mlp(norm2(x))


def _sam_block_forward(self, *args, **kwargs):
    x = args[0] if args else next(iter(kwargs.values()), None)
    if (len(args) + len(kwargs) != 1 or not isinstance(x, torch.Tensor) or _hf_recording("attentions")
            or not _fused_here("rel_pos_attention", x.device, x.dtype)):
        return type(self).forward(self, *args, **kwargs)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled() \
            and hasattr(self, "_gradient_checkpointing_func"):
        # transformers' layers checkpoint in their class forward, which this one replaces: do the same
        return self._gradient_checkpointing_func(functools.partial(_sam_block_body, self), x)
    return _sam_block_body(self, x)


# ---- SAM encoder: neck + compressor ----------------------------------------------------------


def _neck_parts(neck: nn.Module):
    """(conv1x1, norm, conv3x3, norm) of a neck in either layout, or None."""
    if isinstance(neck, nn.Sequential) and len(neck) == 4:
        return tuple(neck)
    if _has(neck, "conv1", "layer_norm1", "conv2", "layer_norm2"):
        return neck.conv1, neck.layer_norm1, neck.conv2, neck.layer_norm2
    return None


def _compressor_parts(enc: nn.Module):
    """(net_2, net_3) in DeepSeek's layout or transformers' (proj.conv1, proj.conv2), or None."""
    if _has(enc, "net_2", "net_3"):
        return enc.net_2, enc.net_3
    proj = getattr(enc, "proj", None)
    if proj is not None and _has(proj, "conv1", "conv2") and len(list(proj.children())) == 2:
        return proj.conv1, proj.conv2
    return None


def _conv_ok(conv, k: int, stride: int, pad: int) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (k, k) and conv.stride == (stride, stride)
            and conv.padding == (pad, pad) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None)


def _conv_desc(conv) -> str:
    if not isinstance(conv, nn.Conv2d):
        return type(conv).__name__
    return (f"Conv2d({conv.in_channels}->{conv.out_channels}, kernel {conv.kernel_size}, stride {conv.stride}, "
            f"padding {conv.padding}, bias={conv.bias is not None})")


def _channel_norm_ok(norm, channels: int) -> bool:
    """A LayerNorm over the channels of NCHW: DeepSeek's LayerNorm2d or transformers' channels-first LayerNorm."""
    w, b, eps = getattr(norm, "weight", None), getattr(norm, "bias", None), getattr(norm, "eps", None)
    if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(eps, float)):
        return False
    if isinstance(norm, nn.LayerNorm) and getattr(norm, "data_format", None) != "channels_first":
        return False
    return tuple(w.shape) == (channels,) == tuple(b.shape)


def _sam_encoder_check(enc: nn.Module) -> tuple[str | None, str, str]:
    """(reason or None, looked_for, found) for a module with a ``neck``."""
    looked = ("a SAM trunk (patch_embed, pos_embed, blocks|layers), a neck (conv1x1, LayerNorm2d, conv3x3, LayerNorm2d) "
              "and a stride-2 compressor (net_2 + net_3, or proj.conv1 + proj.conv2)")
    found = _describe(enc)
    trunk = _attr(enc, "blocks", "layers")[1]
    if not (_has(enc, "patch_embed", "pos_embed") and isinstance(trunk, nn.ModuleList)):
        return "no SAM trunk next to the neck", looked, found
    parts = _neck_parts(enc.neck)
    tail = _compressor_parts(enc)
    if tail is None:
        return ("a neck with no stride-2 compressor after it (SAM's own encoder): its blocks are patched, "
                "the neck runs as it is"), looked, found
    if parts is None:
        return "the neck is not (conv1x1, norm, conv3x3, norm)", looked, f"neck = {_describe(enc.neck)}"
    c0, n1, c2, n3 = parts
    net2, net3 = tail
    wrong = [f"{name} = {_conv_desc(conv)}" for name, conv, k, stride, pad in (
        ("neck conv1x1", c0, 1, 1, 0), ("neck conv3x3", c2, 3, 1, 1), ("first stride-2 conv", net2, 3, 2, 1),
        ("second stride-2 conv", net3, 3, 2, 1)) if not _conv_ok(conv, k, stride, pad)]
    if not wrong:
        wrong += [f"{name} = {norm!r}" for name, norm, c in (("first neck norm", n1, c0.out_channels), ("second neck norm", n3, c2.out_channels))
                  if not _channel_norm_ok(norm, c)]
    if not wrong and not (c2.in_channels == c0.out_channels and net2.in_channels == c2.out_channels
                          and net3.in_channels == net2.out_channels):
        wrong.append(f"channels {c0.in_channels}->{c0.out_channels}, {c2.in_channels}->{c2.out_channels}, "
                     f"{net2.in_channels}->{net2.out_channels}, {net3.in_channels}->{net3.out_channels} do not chain")
    if not wrong and n1.eps != n3.eps:
        wrong.append(f"the neck norms' eps differ ({n1.eps}, {n3.eps})")
    if wrong:
        return ("the neck / compressor differ from DeepEncoder's (1x1, 3x3 pad 1, two 3x3 stride 2, no conv bias, "
                "channel LayerNorms with one eps)"), looked, "; ".join(wrong)
    return None, looked, found


def _compress(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Trunk output [B, H, W, C] (channels-last) -> [B, C3, h, w] (a channels-last view), upstream's NCHW contract."""
    c0, n1, c2, n3 = _neck_parts(enc.neck)
    net2, net3 = _compressor_parts(enc)
    tokens = ops.compress(x, c0.weight, n1.weight, n1.bias, c2.weight, n3.weight, n3.bias, net2.weight, net3.weight, n1.eps)
    h, w = cfg.compressed_side(x.shape[1]), cfg.compressed_side(x.shape[2])
    return tokens.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


def _trunk(enc: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    x = enc.patch_embed(pixels)
    if enc.pos_embed is not None:
        if hasattr(enc, "interpolate_pos_encoding"):    # transformers' encoders resize their own way
            x = x + enc.interpolate_pos_encoding(x.shape[1], x.shape[2])
        else:
            x = x + resize_abs_pos(enc.pos_embed, x.shape[1])
    for blk in (enc.blocks if hasattr(enc, "blocks") else enc.layers):
        x = blk(x)
    return x


def _sam_encoder_forward(self, x, *args, **kwargs):
    """DeepSeek's / vLLM's ``ImageEncoderViT.forward(x) -> [B, C3, h, w]``."""
    if args or kwargs or not _fused_here("compress", x.device, x.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    return _compress(self, _trunk(self, x))


def _hf_sam_encoder_body(output_type):
    """The body of transformers' SAM encoder forward (under its own decorators): trunk, fused tail,
    the same output class."""
    def forward(self, pixel_values=None, **kwargs):
        if pixel_values is None or not _fused_here("compress", pixel_values.device, pixel_values.dtype):
            return self.__dict__[_PATCH]["raw"](self, pixel_values, **kwargs)
        return output_type(last_hidden_state=_compress(self, _trunk(self, pixel_values)))
    return forward


class _CannotRewrap(Exception):
    pass


def _innermost(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _rewrap(fn, body):
    """``fn`` (a function under ``functools.wraps`` decorators) with its innermost function replaced by
    ``body``: the very same decorators (their code, their other closure values) around a new body."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return body
    new_inner = _rewrap(inner, body)
    cells = fn.__closure__ or ()
    hits = [i for i, c in enumerate(cells) if c.cell_contents is inner]
    if len(hits) != 1:
        raise _CannotRewrap(f"{getattr(fn, '__qualname__', fn)} does not close over the function it wraps")
    closure = tuple(types.CellType(new_inner) if i == hits[0] else c for i, c in enumerate(cells))
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__wrapped__ = new_inner
    return new


def _output_type(raw):
    try:
        hint = typing.get_type_hints(raw).get("return")
    except Exception:
        hint = None
    return hint if isinstance(hint, type) and hasattr(hint, "last_hidden_state") else None


# ---- CLIP attention with a fused qkv_proj (DeepSeek's, vLLM's) -------------------------------


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


def _clip_attention_forward(self, *args, **kwargs):
    # vLLM passes hidden_states=, DeepSeek x positionally; anything more goes to the original
    x = args[0] if args else next(iter(kwargs.values()), None)
    if len(args) + len(kwargs) != 1 or not isinstance(x, torch.Tensor) or not _fused_here("varlen_attention", x.device, x.dtype):
        return type(self).forward(self, *args, **kwargs)
    B, N, _ = x.shape
    heads = _clip_heads(self)
    qkv = _linear(self.qkv_proj, x)                  # [B, N, 3 * heads * d]: this rank's heads only under TP
    d = qkv.shape[-1] // (3 * heads)
    q, k, v = qkv.reshape(B * N, 3, heads, d).unbind(1)
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=x.device)   # shapes only: no host sync
    out = ops.varlen_attention(q, k, v, cu, N, getattr(self, "scale", None), check_values=False)
    out = _linear(self.out_proj, out.reshape(B, N, heads * d))   # a RowParallelLinear all-reduces here
    returns = self.__dict__[_PATCH]["returns"]
    return out if returns == 1 else (out,) + (None,) * (returns - 1)


def _clip_check(module) -> str | None:
    try:
        heads = _clip_heads(module)
    except AttributeError:
        return "its head count is not set"
    width = getattr(getattr(module.qkv_proj, "weight", None), "shape", (None,))[0]
    if width is not None and width % (3 * heads):
        return f"qkv_proj's {width} outputs do not split into q, k, v of {heads} heads"
    if _returned_values(module) is None:
        return "cannot tell from its forward's source what it returns"
    return None


# ---- DeepSeek-OCR 2's causal-flow stage --------------------------------------------------------


def _decoder_layers_check(decoder: nn.Module) -> str | None:
    """None when ``decoder`` is a Qwen2-shaped stack the fused stage can run; else what differs."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return "no `layers` ModuleList"
    for i, layer in enumerate(layers):
        if not _has(layer, "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            return f"layers.{i} is not (input_layernorm, self_attn, post_attention_layernorm, mlp): {_describe(layer)}"
        att = layer.self_attn
        if not _has(att, "q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
            return f"layers.{i}.self_attn has no q_proj/k_proj/v_proj/o_proj/head_dim: {_describe(att)}"
        if getattr(att, "sliding_window", None):
            return f"layers.{i}.self_attn uses a sliding window ({att.sliding_window})"
        if getattr(att, "attention_dropout", 0.0) and att.training:
            return f"layers.{i}.self_attn trains with attention dropout {att.attention_dropout}"
        d = att.head_dim
        if att.q_proj.out_features % d or att.k_proj.out_features % d or (att.q_proj.out_features // d) % (att.k_proj.out_features // d):
            return f"layers.{i}.self_attn's q/k widths do not split into GQA heads of {d}"
    return None


def _causal_flow_holder(module: nn.Module):
    """(bank names, decoder path) when ``module`` holds query banks: DeepSeek's/vLLM's ``query_768`` /
    ``query_1024`` or transformers' ``query_768_resolution`` / ``query_1024_resolution``."""
    banks = [n for n, c in module.named_children() if n.startswith(("query_768", "query_1024")) and isinstance(c, nn.Embedding)]
    return sorted(banks)


def _find_decoder(holder: nn.Module):
    """The Qwen2-shaped stack under a query-bank holder: (path, module) of the shallowest module with
    ``layers`` + ``norm`` + ``rotary_emb``."""
    best = None
    for path, m in holder.named_modules():
        if path and _has(m, "layers", "norm", "rotary_emb") and (best is None or path.count(".") < best[0].count(".")):
            best = (path, m)
    return best


def _mask_hook_ignored(decoder: nn.Module) -> str | None:
    """For DeepSeek's own V2 code: its Qwen2Model subclass overrides ``_update_causal_mask`` to build the
    prefix-LM mask, but transformers >= 4.53's ``Qwen2Model.forward`` never calls that hook (image
    tokens then attend causally). Returns the explanation when that is the case here, else None.
    vLLM's port passes the mask as ``attention_mask={"full_attention": mask}`` itself: not ignored."""
    mro = type(decoder).__mro__
    ours = [c for c in mro if not c.__module__.startswith("transformers.") and c not in (nn.Module, object)]
    base = next((c for c in mro if c.__module__.startswith("transformers.") and "forward" in vars(c)), None)
    if base is None or not any("_update_causal_mask" in vars(c) for c in ours):
        return None
    try:
        base_src = inspect.getsource(base.forward)
    except (OSError, TypeError):
        return None
    if "_update_causal_mask" in base_src:
        return None   # transformers <= 4.52: the hook runs
    for c in ours:
        if "forward" in vars(c):
            try:
                if "full_attention" in inspect.getsource(c.forward):
                    return None   # passes its own mask mapping (vLLM's port)
            except (OSError, TypeError):
                return None
    import transformers

    return (f"its {type(decoder).__name__}._update_causal_mask (the prefix-LM mask) is never called by transformers "
            f"{transformers.__version__}'s {base.__name__}.forward (>= 4.53), so the original code attends causally over "
            "the image tokens; the accelerated stage computes the intended prefix-LM attention (image tokens "
            "bidirectional, queries causal)")


def _causal_flow_forward(self, x, *args, **kwargs):
    """DeepSeek's / vLLM's ``qwen2_model(x)``: SAM features [B, C, h, w] -> the n query outputs [B, n, C]."""
    spec = self.__dict__[_PATCH]
    if args or kwargs or (not spec["corrects"] and not _fused_here("varlen_attention", x.device, x.dtype)):
        return type(self).forward(self, x, *args, **kwargs)
    decoder = spec["decoder"]
    tokens = x.flatten(2).transpose(1, 2)
    B, n, _ = tokens.shape
    bank = next((getattr(self, name) for name in spec["banks"] if getattr(self, name).num_embeddings == n), None)
    if bank is None:
        sizes = ", ".join(f"{name} holds {getattr(self, name).num_embeddings}" for name in spec["banks"])
        raise ValueError(f"{spec['path'] or 'qwen2_model'}: no query bank for {n} image tokens ({sizes}); the bank is "
                         "chosen by token count, so views must be 768 or 1024 px")
    h = torch.cat([tokens, bank.weight.unsqueeze(0).expand(B, -1, -1)], dim=1)
    L = 2 * n
    cos, sin = decoder.rotary_emb(h, torch.arange(L, device=h.device).unsqueeze(0))   # [1, L, d], h's dtype
    cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=h.device)           # shapes only: no host read
    prefix = torch.full((B,), n, dtype=torch.int32, device=h.device)
    config = getattr(decoder, "config", None)
    layers = decoder.layers[: getattr(config, "num_hidden_layers", len(decoder.layers))]
    for layer in layers:
        att = layer.self_attn
        a = layer.input_layernorm(h)
        d = att.head_dim
        q = att.q_proj(a).reshape(B * L, -1, d)
        k = att.k_proj(a).reshape(B * L, -1, d)
        v = att.v_proj(a).reshape(B * L, -1, d)
        o = ops.varlen_attention(q, k, v, cu, L, float(att.scaling), check_values=False,
                                 prefix_lens=prefix, rope_cos=cos[0], rope_sin=sin[0])
        h = h + att.o_proj(o.reshape(B, L, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return decoder.norm(h)[:, n:]


# ---- transformers' AttentionInterface --------------------------------------------------------


def _prefix_mask(B: int, L: int, prefix: int | None, device, dtype, additive: bool):
    """The mask transformers builds for this stage ([B, 1, L, L]: bool for sdpa, 0 / finfo.min for eager);
    used only when the original attention function runs (weights asked for, or no faster path)."""
    if prefix is None:
        return None
    i = torch.arange(L, device=device)
    allowed = (i[None, :] <= i[:, None]) | ((i[:, None] < prefix) & (i[None, :] < prefix))
    allowed = allowed[None, None].expand(B, 1, L, L)
    if not additive:
        return allowed
    return torch.where(allowed, torch.tensor(0.0, device=device, dtype=dtype), torch.finfo(dtype).min)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (``AttentionInterface``) for the attentions ``accelerate()``
    routed: q [B, H, L, d], k/v [B, Hkv, L, d] (RoPE applied by the model) -> ([B, L, H, d], None).
    Bidirectional (CLIP) or prefix-LM (the causal-flow stage: the prefix length comes from the
    stack's forward, no mask is built). The original function runs when weights are recorded, in
    training with dropout, or where no faster path exists (with the mask transformers would build)."""
    spec = module.__dict__.get(_PATCH)
    if spec is None:
        raise RuntimeError(f"{type(module).__name__} uses the {ATTN_IMPL!r} attention implementation through a config that "
                           "accelerate() switched, but was not routed by it (built afterwards?): dk.restore(model), then "
                           "dk.accelerate(model) again")
    original = spec["attn_impl"]
    prefix = kwargs.pop(_PREFIX_KW, None)
    if spec.get("prefix") and prefix is None:
        raise RuntimeError(f"{type(module).__name__} routed to {ATTN_IMPL!r} by accelerate() was called without its "
                           "prefix length: call the model through its stack's forward, or dk.restore(model)")
    if attention_mask is not None:
        raise ValueError(f"{ATTN_IMPL!r} attention got an attention_mask of shape {tuple(attention_mask.shape)}: "
                         "DeepEncoder's attention has none (its prefix-LM mask is computed in the op); dk.restore(model) "
                         "to run masked attention")
    B, H, L, d = query.shape
    if (dropout and dropout > 0) or (original == "eager" and _hf_recording("attentions")) \
            or kwargs.get("sliding_window") or not _fused_here("varlen_attention", query.device, query.dtype):
        mask = _prefix_mask(B, L, prefix, query.device, query.dtype, additive=original == "eager")
        fn = _original_attention(module, original)
        return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    q = query.transpose(1, 2).reshape(B * L, H, d)
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], d)
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], d)
    cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=query.device)
    prefix_lens = None if prefix is None else torch.full((B,), prefix, dtype=torch.int32, device=query.device)
    out = ops.varlen_attention(q, k, v, cu, L, None if scaling is None else float(scaling), check_values=False,
                               prefix_lens=prefix_lens)
    return out.view(B, L, H, d), None


def _original_attention(module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _hf_attention)


def _routes_through_interface(attn: nn.Module) -> bool:
    """Whether ``type(attn).forward`` looks its attention function up in transformers' AttentionInterface."""
    try:
        src = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src and hasattr(getattr(attn, "config", None), "_attn_implementation")


def _prefix_stack_forward(self, inputs_embeds, num_patches, *args, **kwargs):
    """transformers' V2 ``vision_encoder(inputs_embeds, num_patches, ...)``: its own forward (decorators,
    RoPE, hooks), with the prefix length handed to the attention function instead of a mask."""
    return type(self).forward(self, inputs_embeds, num_patches, *args, **{_PREFIX_KW: int(num_patches)}, **kwargs)


# ---- recognition and patching ----------------------------------------------------------------


def _looks_like_sam_attention(m) -> bool:
    return hasattr(m, "qkv") and (hasattr(m, "rel_pos_h") or hasattr(m, "rel_pos_w"))


def _looks_like_clip_stack(m) -> bool:
    """An encoder stack of transformers-style attentions (q_proj/k_proj/v_proj + out_proj)."""
    layers = getattr(m, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return False
    att = getattr(layers[0], "self_attn", None)
    return att is not None and _has(att, "q_proj", "k_proj", "v_proj", "out_proj")


def _has_sam_with_compressor(m: nn.Module) -> bool:
    return any(hasattr(c, "neck") and _sam_encoder_check(c)[0] is None for c in m.children())


@dataclass
class _Plan:
    path: str
    module: nn.Module
    kind: str
    via: str
    apply: typing.Callable[[], None]
    entries: list = field(default_factory=list)   # the report's lines (default: one for the module)


def _set_forward(module: nn.Module, fn, kind: str, **extra) -> None:
    module.__dict__[_PATCH] = {"kind": kind, "forward": True, **extra}
    module.forward = types.MethodType(fn, module)


def accelerate(model: nn.Module) -> AccelerationReport:
    """Patch every recognised DeepEncoder part of ``model`` in place; returns what was done, what was
    left alone (and why: what was looked for, what was found), what was corrected, and where parts keep
    their original forward because the package has nothing faster there."""
    report = AccelerationReport()
    plans: list[_Plan] = []
    covered: set[int] = set()     # modules reported through a parent
    named = list(model.named_modules())

    def left(path, kind, why, looked_for="", found=""):
        report.left_alone.append(LeftAlone(path, kind, why, looked_for, found))

    def already(m) -> bool:
        return _PATCH in m.__dict__

    for path, m in named:
        if id(m) in covered:
            continue
        if type(m).__module__.startswith("deepencoder_kernels."):   # the package's own modules (V1 and V2)
            left(path, type(m).__name__, "a deepencoder_kernels module: already on the package's ops")
            covered.update(id(c) for c in m.modules())
            continue

        # SAM block (the attention is reported with it)
        if _looks_like_sam_attention(getattr(m, "attn", None)):
            covered.add(id(m.attn))
            why, found = _sam_block_check(m)
            looked = "norm1|layer_norm1, attn(qkv, proj, rel_pos_h, rel_pos_w, num_heads|num_attention_heads), norm2|layer_norm2, mlp, window_size"
            if why:
                left(path, "sam block", why, looked, found)
            elif already(m):
                left(path, "sam block", "already accelerated")
            else:
                plans.append(_Plan(path, m, "sam block", "forward", functools.partial(_set_forward, m, _sam_block_forward, "sam block")))
            continue
        if _looks_like_sam_attention(m):
            left(path, "sam attention", "not inside a SAM block (the block holds the window size and the padding)",
                 "a parent with norm1|layer_norm1, attn, norm2|layer_norm2, mlp, window_size", _describe(m))
            continue

        # SAM encoder: neck + compressor
        if hasattr(m, "neck") and isinstance(getattr(m, "neck"), nn.Module):
            why, looked, found = _sam_encoder_check(m)
            if why:
                left(path, "sam encoder", why, looked, found)
            elif already(m):
                left(path, "sam encoder", "already accelerated")
            else:
                plan = _plan_sam_encoder(path, m, left)
                if plan is not None:
                    plans.append(plan)
            # the blocks inside are visited on their own

        # CLIP attention with a fused qkv_proj
        if _has(m, "qkv_proj", "out_proj"):
            if not any(hasattr(m, n) for n in ("num_heads", "num_heads_per_partition", "n_local_heads")):
                left(path, "clip attention", "its head count is not set", "qkv_proj, out_proj and num_heads|num_heads_per_partition",
                     _describe(m))
                continue
            why = _clip_check(m)
            if why:
                left(path, "clip attention", why, "qkv_proj splitting into q, k, v; a forward returning out or (out, None, ...)",
                     _describe(m))
            elif already(m):
                left(path, "clip attention", "already accelerated")
            else:
                plans.append(_Plan(path, m, "clip attention", "forward", functools.partial(
                    _set_forward, m, _clip_attention_forward, "clip attention", returns=_returned_values(m))))
            continue

        # DeepSeek-OCR 2's causal-flow stage: a decoder stack with query banks
        banks = _causal_flow_holder(m)
        if banks:
            _plan_causal_flow(path, m, banks, plans, report, named, left)   # its SAM encoder (transformers') is visited on its own
            decoder = _find_decoder(m)
            if decoder is not None:
                covered.add(id(decoder[1]))   # planned (or reported) with its banks

        # transformers' V2 stack on its own (accelerate() called on the vision_encoder itself)
        if _has(m, "layers", "norm", "rotary_emb") and _forward_params(m)[1:3] == ["inputs_embeds", "num_patches"]:
            why = _decoder_layers_check(m)
            if why:
                left(path, "causal flow", why, "a Qwen2-shaped decoder taking (inputs_embeds, num_patches)", _describe(m))
            else:
                _plan_interface_stack(path, m, "causal flow", True, plans, named, left)
            continue

        # DeepEncoder v1's CLIP in transformers' layout (the v1 port): a q/k/v attention stack next to a SAM encoder
        if _looks_like_clip_stack(m):
            parent = _parent_of(named, path)
            grandparent = _parent_of(named, _parent_path(path)) if parent is not None else None
            if any(a is not None and _has_sam_with_compressor(a) for a in (parent, grandparent)):
                _plan_interface_stack(path, m, "clip attention", False, plans, named, left)
                continue

        # projectors: one Linear each, nothing to fuse
        if hasattr(m, "projector") and _has(m.projector, "layers"):
            left(f"{path}.projector" if path else "projector", "projector", "one Linear: already a single GEMM, nothing to fuse")
        if isinstance(getattr(m, "multi_modal_projector", None), nn.Linear):
            left(f"{path}.multi_modal_projector" if path else "multi_modal_projector", "projector",
                 "one Linear: already a single GEMM, nothing to fuse")

    applied: list[_Plan] = []
    try:
        for plan in plans:
            plan.apply()
            applied.append(plan)
            report.patched += plan.entries or [Patched(plan.path, plan.kind, plan.via)]
    except Exception:
        for plan in applied:
            _restore_module(plan.module)
        _restore_configs(model)
        raise
    _note_devices(report, plans)
    return report


def _forward_params(m: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return []


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _parent_of(named, path: str):
    if not path:
        return None
    want = _parent_path(path)
    return next((m for p, m in named if p == want), None)


def _plan_sam_encoder(path: str, m: nn.Module, left) -> _Plan | None:
    raw = _innermost(type(m).forward)
    if raw is type(m).forward:   # a plain forward (DeepSeek's, vLLM's, Meta's layout)
        return _Plan(path, m, "sam encoder", "forward", functools.partial(_set_forward, m, _sam_encoder_forward, "sam encoder"))

    def apply():
        out_type = _output_type(raw)
        if out_type is None:
            raise _CannotRewrap("cannot tell its output class from its forward's annotations")
        fn = _rewrap(type(m).forward, _hf_sam_encoder_body(out_type))
        m.__dict__[_PATCH] = {"kind": "sam encoder", "forward": True, "raw": raw}
        m.forward = types.MethodType(fn, m)

    try:   # check it can be rewrapped now, so a failure is a report line, not an exception
        if _output_type(raw) is None:
            raise _CannotRewrap("cannot tell its output class from its forward's annotations")
        _rewrap(type(m).forward, _hf_sam_encoder_body(object))
    except _CannotRewrap as e:
        left(path, "sam encoder", f"its forward's decorators cannot be kept around a new body ({e}); its blocks are patched")
        return None
    return _Plan(path, m, "sam encoder", "forward (decorators kept)", apply)


def _plan_causal_flow(path, m, banks, plans, report, named, left):
    looked = ("query banks (query_768, query_1024) over a Qwen2-shaped decoder (layers of input_layernorm, "
              "self_attn(q/k/v/o_proj, head_dim), post_attention_layernorm, mlp; norm; rotary_emb)")
    found_dec = _find_decoder(m)
    if found_dec is None:
        left(path, "causal flow", "no decoder stack under the query banks", looked, _describe(m))
        return
    dec_path, decoder = found_dec
    why = _decoder_layers_check(decoder)
    if why:
        left(path, "causal flow", why, looked, f"{dec_path} = {_describe(decoder)}")
        return
    full_dec_path = f"{path}.{dec_path}" if path else dec_path
    if set(banks) == {"query_768", "query_1024"}:
        # DeepSeek's / vLLM's qwen2_model(x): its forward is replaced by the fused stage
        try:
            params = list(inspect.signature(type(m).forward).parameters)
        except (TypeError, ValueError):
            params = []
        if params[1:2] != ["x"] or len(params) != 2:
            left(path, "causal flow", "its forward is not qwen2_model(x) (SAM features in, query outputs out)", looked,
                 f"forward{tuple(params[1:])}")
            return
        if _PATCH in m.__dict__:
            left(path, "causal flow", "already accelerated")
            return
        corrects = _mask_hook_ignored(decoder)
        if corrects:
            report.corrected.append((path, corrects))
        plans.append(_Plan(path, m, "causal flow", "forward", functools.partial(
            _set_forward, m, _causal_flow_forward, "causal flow", decoder=decoder, banks=sorted(banks),
            corrects=bool(corrects), path=path)))
        return
    # transformers' native stack: vision_encoder(inputs_embeds, num_patches, ...) with its attention
    # routed through the AttentionInterface, the prefix length passed down instead of a mask
    fwd = _forward_params(decoder)
    if fwd[1:3] != ["inputs_embeds", "num_patches"]:
        left(path, "causal flow", "its decoder's forward does not take (inputs_embeds, num_patches)", looked,
             f"{dec_path}.forward{tuple(fwd[1:])}")
        return
    _plan_interface_stack(full_dec_path, decoder, "causal flow", True, plans, named, left)


def _plan_interface_stack(path, stack, kind, prefix, plans, named, left):
    """Route every ``layers[i].self_attn`` of ``stack`` through the AttentionInterface (one config switch)."""
    attns = [layer.self_attn for layer in stack.layers]
    config = getattr(attns[0], "config", None)
    looked = "attentions that look their function up in transformers' AttentionInterface, sharing one config"
    if not all(_routes_through_interface(a) and a.config is config for a in attns):
        left(path, kind, "its attentions are not routed through transformers' AttentionInterface with one config", looked,
             f"{type(attns[0]).__name__} (config {type(config).__name__})")
        return
    original = config._attn_implementation
    if original == ATTN_IMPL or any(_PATCH in a.__dict__ for a in attns):
        left(path, kind, "already accelerated")
        return
    if original not in ("sdpa", "eager"):
        left(path, kind, f"attn_implementation {original!r}: the fused path stands in for 'sdpa' and 'eager' only", looked,
             f"config._attn_implementation = {original!r}")
        return
    users = [p for p, mod in named if getattr(mod, "config", None) is config and _routes_through_interface(mod)
             and not any(mod is a for a in attns)]
    if users:
        left(path, kind, f"its config is shared with attentions outside the stack ({users[0]}): switching it would reroute them",
             looked, ", ".join(users[:3]))
        return
    if prefix and _PATCH in stack.__dict__:
        left(path, kind, "already accelerated")
        return

    def apply():
        _register_attention()
        for a in attns:
            a.__dict__[_PATCH] = {"kind": kind, "forward": False, "attn_impl": original, "prefix": prefix, "config": config}
        config._attn_implementation = ATTN_IMPL
        if prefix:
            _set_forward(stack, _prefix_stack_forward, kind, routes=True)

    if prefix:   # one stage: reported once, as DeepSeek's qwen2_model is
        via = f"AttentionInterface for its {len(attns)} attentions, the prefix length from its forward"
        entries = [Patched(path, kind, via)]
    else:        # one line per attention, as DeepSeek's CLIP attentions are
        via = "AttentionInterface"
        entries = [Patched(f"{path}.layers.{i}.self_attn" if path else f"layers.{i}.self_attn", kind, via) for i in range(len(attns))]
    plans.append(_Plan(path, stack, kind, via, apply, entries))


def _note_devices(report: AccelerationReport, plans: list[_Plan]) -> None:
    """Say where patched parts keep their original forward under ``auto`` (never slower)."""
    ops_of = {"sam block": "rel_pos_attention", "sam encoder": "compress", "clip attention": "varlen_attention",
              "causal flow": "varlen_attention"}
    slow: dict[tuple, dict[str, list[str]]] = {}
    for plan in plans:
        op = ops_of.get(plan.kind)
        p = _first_param(plan.module)
        if op is None or p is None or p.device.type == "meta":
            continue
        if plan.kind == "causal flow" and plan.module.__dict__.get(_PATCH, {}).get("corrects"):
            continue
        if _faster_backend(op, p.device, p.dtype) is None:
            slow.setdefault((p.device.type, p.dtype), {}).setdefault(op, []).extend(e.kind for e in plan.entries or [plan])
    for (dev, dtype), by_op in slow.items():
        kinds = [k for ks in by_op.values() for k in ks]
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
        report.original_here.append(
            f"on {dev} ({dtype}) the package has no {' / '.join(by_op)} faster than these modules' own code: {counts} "
            "keep their original forward there under backend 'auto' (the ops run where a faster backend exists, "
            "or under dk.backend(...))")


# ---- restore ---------------------------------------------------------------------------------


def _restore_module(module: nn.Module) -> bool:
    spec = module.__dict__.pop(_PATCH, None)
    if spec is None:
        return False
    if spec.get("forward"):
        module.__dict__.pop("forward", None)
    config = spec.get("config")
    if config is not None and getattr(config, "_attn_implementation", None) == ATTN_IMPL:
        config._attn_implementation = spec["attn_impl"]
    return True


def _restore_configs(model: nn.Module) -> None:
    for m in model.modules():
        spec = m.__dict__.get(_PATCH)
        if spec and spec.get("config") is not None:
            _restore_module(m)


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`; returns how many modules were restored."""
    return sum(_restore_module(m) for m in model.modules())


@contextlib.contextmanager
def accelerated(model: nn.Module):
    """``with accelerated(model) as report:`` runs the block on the package's ops, then restores."""
    report = accelerate(model)
    try:
        yield report
    finally:
        restore(model)
