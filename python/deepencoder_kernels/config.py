"""Every number the package depends on, in one place: architecture, modes, tolerances.

Kernel launch/tile configs live in ``kernels/configs.py`` so the static report, the launchers and
the tests read the same table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# --- SAM-base trunk -------------------------------------------------------------------------
SAM_PATCH = 16
SAM_DIM = 768
SAM_DEPTH = 12
SAM_HEADS = 12
SAM_WINDOW = 14
SAM_GLOBAL_BLOCKS = (2, 5, 8, 11)
SAM_MLP_DIM = 3072
SAM_POS_GRID = 64              # pos_embed is [1, 64, 64, 768]
SAM_NECK_DIM = 256
SAM_OUT_DIM = 1024             # after net_2 (512) and net_3 (1024)
SAM_LN_EPS = 1e-6

# --- CLIP-large over the compressed grid ----------------------------------------------------
CLIP_DIM = 1024
CLIP_DEPTH = 24
CLIP_HEADS = 16
CLIP_MLP_DIM = 4096
CLIP_POS_GRID = 16             # position_embedding is [16*16 + 1, 1024]
CLIP_PATCH = 14                # patch_embedding exists in the checkpoint but is never used
CLIP_LN_EPS = 1e-5

# --- projector + layout ---------------------------------------------------------------------
PROJ_IN = 2048
PROJ_OUT = 1280
HEAD_DIM = 64


@dataclass(frozen=True)
class Mode:
    name: str
    base_size: int            # the global view's side in pixels
    tiles: bool = False       # Gundam: 640 px tiles + a 1024 global view
    tile_size: int = 640
    letterbox: bool = True    # Base/Large pad with gray; Tiny/Small resize directly


MODES = {
    "tiny": Mode("tiny", 512, letterbox=False),
    "small": Mode("small", 640, letterbox=False),
    "base": Mode("base", 1024),
    "large": Mode("large", 1280),
    "gundam": Mode("gundam", 1024, tiles=True),
}
GUNDAM_MIN_CROPS = 2
GUNDAM_MAX_CROPS = 9          # the HF code; the vLLM config uses 6
PAD_GRAY = (127, 127, 127)    # int(0.5 * 255)


def check_image_size(image_size, name: str = "image_size") -> int:
    """A view side upstream's SAM can take: a positive multiple of the 16 px patch (the patch embed
    would silently drop the remainder, and upstream's ``pos_embed`` resize assumes whole patches)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < SAM_PATCH or image_size % SAM_PATCH:
        raise ValueError(f"{name} must be a positive multiple of {SAM_PATCH} pixels, got {image_size!r}")
    return image_size


def stride2_side(side: int) -> int:
    """Side after one 3x3, stride-2, padding-1 conv (``net_2`` / ``net_3``): ceil(side / 2)."""
    return (side + 1) // 2


def sam_grid(image_size: int) -> int:
    """Tokens per side after the 16 px patch embed."""
    return check_image_size(image_size) // SAM_PATCH


def compressed_side(grid: int) -> int:
    """Trunk grid side -> compressed side after net_2 and net_3: ceil(ceil(g / 2) / 2).
    The one rule every token count, shape and FLOP formula derives the compressed grid from."""
    return stride2_side(stride2_side(grid))


def compressed_grid(image_size: int) -> int:
    """Tokens per side after the two stride-2 convs (64 -> 16; 10 -> 3 at 160 px)."""
    return compressed_side(sam_grid(image_size))


def view_tokens(image_size: int) -> int:
    """Projected tokens of one view with a newline after every row: h * (w + 1)."""
    g = compressed_grid(image_size)
    return g * (g + 1)


# --- test tolerances, per dtype: (atol, rtol). Read by the tests and the benchmarks. ---------
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
