"""Load DeepSeek-OCR's (v1) and DeepSeek-OCR 2's (V2) vision weights from safetensors, reading only
the keys the encoder needs.

Key layouts read, each with or without the ``model.`` prefix of the Hub files:
- DeepSeek's own names (the Hub checkpoints ``deepseek-ai/DeepSeek-OCR`` and ``DeepSeek-OCR-2``), which
  are the encoders' ``state_dict()`` names;
- for V2 also transformers' native ``deepseek_ocr2`` names (``vision_tower.sam_encoder.layers.N.layer_norm1``,
  ``vision_tower.vision_encoder.layers``, ``query_768_resolution``, ``multi_modal_projector``,
  ``view_separator``, ...), mapped back by :data:`TRANSFORMERS_V2_NAMES` (the inverse of transformers'
  conversion mapping for ``deepseek_ocr2``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

PREFIX = "model."

# transformers' native deepseek_ocr2 name -> DeepSeek-OCR 2's name (first match wins)
TRANSFORMERS_V2_NAMES = tuple((re.compile(a), b) for a, b in (
    (r"^vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm1\.", r"sam_model.blocks.\1.norm1."),
    (r"^vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm2\.", r"sam_model.blocks.\1.norm2."),
    (r"^vision_tower\.sam_encoder\.layers\.(\d+)\.", r"sam_model.blocks.\1."),        # attn.*, mlp.* as DeepSeek's
    (r"^vision_tower\.sam_encoder\.patch_embed\.projection\.", "sam_model.patch_embed.proj."),
    (r"^vision_tower\.sam_encoder\.pos_embed$", "sam_model.pos_embed"),
    (r"^vision_tower\.sam_encoder\.neck\.conv1\.", "sam_model.neck.0."),
    (r"^vision_tower\.sam_encoder\.neck\.layer_norm1\.", "sam_model.neck.1."),
    (r"^vision_tower\.sam_encoder\.neck\.conv2\.", "sam_model.neck.2."),
    (r"^vision_tower\.sam_encoder\.neck\.layer_norm2\.", "sam_model.neck.3."),
    (r"^vision_tower\.sam_encoder\.proj\.conv1\.", "sam_model.net_2."),
    (r"^vision_tower\.sam_encoder\.proj\.conv2\.", "sam_model.net_3."),
    (r"^vision_tower\.vision_encoder\.layers\.", "qwen2_model.model.model.layers."),
    (r"^vision_tower\.vision_encoder\.norm\.", "qwen2_model.model.model.norm."),
    (r"^vision_tower\.query_768_resolution\.", "qwen2_model.query_768."),
    (r"^vision_tower\.query_1024_resolution\.", "qwen2_model.query_1024."),
    (r"^multi_modal_projector\.", "projector.layers."),
    (r"^view_separator$", "view_seperator"),
))
RENAMES = {"v1": (), "v2": TRANSFORMERS_V2_NAMES}


def canonical_name(key: str, generation: str = "v1") -> str:
    """A checkpoint key -> the encoder's ``state_dict`` name: the ``model.`` prefix dropped, then
    transformers' native names mapped to DeepSeek's."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for pattern, replacement in RENAMES[generation]:
        renamed, hits = pattern.subn(replacement, name)
        if hits:
            return renamed
    return name


def _files(path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in folder {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return [path]


def read_vision_state(path, wanted: set[str], generation: str = "v1") -> dict[str, torch.Tensor]:
    """Tensors whose :func:`canonical_name` is in ``wanted``, by that name; others are skipped unread,
    so a multi-GB checkpoint with the language model costs only the vision bytes. Two keys that map to
    one name (both layouts in one checkpoint) are an error naming both."""
    from safetensors import safe_open

    state, source = {}, {}
    for file in _files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = canonical_name(key, generation)
                if name not in wanted:
                    continue
                if name in source:
                    raise ValueError(f"checkpoint {path}: keys {source[name]!r} and {key!r} ({file.name}) both give {name!r}")
                source[name] = key
                state[name] = f.get_tensor(key)
    return state


def load_checkpoint(model: nn.Module, path, strict: bool = True) -> dict[str, list[str]]:
    """Copy the checkpoint's vision weights into ``model`` (cast to each parameter's dtype).

    ``model``: a :class:`~deepencoder_kernels.DeepEncoder` or :class:`~deepencoder_kernels.DeepEncoderV2`
    (its ``generation`` picks the key layouts read); ``path``: a ``.safetensors`` file or a folder of them.
    Raises ValueError listing missing keys (when ``strict``) and every shape mismatch, FileNotFoundError
    for a missing path. Returns ``{"loaded": [...], "missing": [...]}``.
    """
    own = model.state_dict()
    state = read_vision_state(path, set(own), getattr(model, "generation", "v1"))
    missing = sorted(set(own) - set(state))
    mis_shaped = [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                  for k, v in sorted(state.items()) if v.shape != own[k].shape]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing keys: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped keys: " + "; ".join(mis_shaped[:20]))
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return {"loaded": sorted(state), "missing": missing}
