"""Load DeepSeek-OCR's vision weights from safetensors, reading only the keys the encoder needs."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PREFIX = "model."


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


def read_vision_state(path, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Tensors whose name (after dropping a ``model.`` prefix) is in ``wanted``; others are skipped
    unread, so a multi-GB checkpoint with the language model costs only the vision bytes."""
    from safetensors import safe_open

    state = {}
    for file in _files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key[len(PREFIX):] if key.startswith(PREFIX) else key
                if name in wanted:
                    state[name] = f.get_tensor(key)
    return state


def load_checkpoint(model: nn.Module, path, strict: bool = True) -> dict[str, list[str]]:
    """Copy the checkpoint's vision weights into ``model`` (cast to each parameter's dtype).

    Raises ValueError listing missing keys (when ``strict``) and every shape mismatch.
    Returns ``{"loaded": [...], "missing": [...]}``.
    """
    own = model.state_dict()
    state = read_vision_state(path, set(own))
    missing = sorted(set(own) - set(state))
    mis_shaped = [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                  for k, v in sorted(state.items()) if v.shape != own[k].shape]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing keys: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped keys: " + "; ".join(mis_shaped[:20]))
    if problems:
        raise ValueError(f"checkpoint {path} does not fit DeepEncoder:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return {"loaded": sorted(state), "missing": missing}
