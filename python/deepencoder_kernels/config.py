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
SAM_NET2_DIM = 512             # net_2's output channels (both generations)
SAM_OUT_DIM = 1024             # net_3's output channels in v1 (V2: CAUSAL_FLOW_DIM = 896)
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

# --- DeepEncoder V2 (DeepSeek-OCR 2): the Qwen2-0.5B-shaped "decoder as encoder" ---------------
# (DeepSeek-OCR-2 ``deepencoderv2/qwen2_d2e.py``): it reads [n image tokens; n learned queries] under a
# prefix-LM mask and returns the queries. net_3 goes to CAUSAL_FLOW_DIM channels.
CAUSAL_FLOW_DIM = 896
CAUSAL_FLOW_DEPTH = 24
CAUSAL_FLOW_HEADS = 14
CAUSAL_FLOW_KV_HEADS = 2       # GQA 7:1
CAUSAL_FLOW_MLP_DIM = 4864     # SiLU-gated
CAUSAL_FLOW_RMS_EPS = 1e-6
CAUSAL_FLOW_ROPE_THETA = 1e6
QUERY_BANKS = {144: "query_768", 256: "query_1024"}   # image tokens n -> its learned query bank (n queries)
V2_VIEW_SIZES = (768, 1024)    # the only view sides with a query bank
V2_PROJ_IN = CAUSAL_FLOW_DIM   # projector.layers: Linear 896 -> 1280


@dataclass(frozen=True)
class Mode:
    name: str
    base_size: int                  # the global view's side in pixels (letterboxed into it with gray)
    tiles: bool = False             # plus tiles of ``tile_size`` when a side exceeds it
    tile_size: int = 640
    resize_first: int | None = None   # first ``image.resize((r, r))`` (PIL's default filter), then the pad
    min_crops: int = 2
    max_crops: int = 9              # the tile budget (an argument can override it)

    @property
    def letterbox(self) -> bool:
        return self.resize_first is None


MODES = {
    "tiny": Mode("tiny", 512, resize_first=512),
    "small": Mode("small", 640, resize_first=640),
    "base": Mode("base", 1024),
    "large": Mode("large", 1280),
    "gundam": Mode("gundam", 1024, tiles=True),
}
GUNDAM_MIN_CROPS = 2
GUNDAM_MAX_CROPS = 9          # the HF code; the vLLM config uses 6
PAD_GRAY = (127, 127, 127)    # int(0.5 * 255)

# DeepSeek-OCR 2 (``process/image_process.py``, ``config.py``): a 1024 global view always; with crop mode
# (``dynamic``) 768 px tiles when a side exceeds 768 (2..6 tiles); crop mode off (``base``): the image is
# first resized to 768 x 768, then padded (upscaled) into the 1024 view, upstream's own quirk.
MODES_V2 = {
    "dynamic": Mode("dynamic", 1024, tiles=True, tile_size=768, max_crops=6),
    "base": Mode("base", 1024, resize_first=768),
}
MODELS = {"v1": MODES, "v2": MODES_V2}


def mode_of(mode: str, model: str = "v1") -> Mode:
    """The :class:`Mode` named ``mode`` of encoder generation ``model`` ("v1" or "v2"), or a clear error."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    modes = MODELS[model]
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)} for model {model}, got {mode!r}")
    return modes[mode]


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


def check_v2_view_size(image_size, name: str = "image_size") -> int:
    """A view side DeepEncoder V2 takes: 768 or 1024 (the sides with a learned query bank)."""
    if image_size not in V2_VIEW_SIZES:
        raise ValueError(f"{name} must be one of {V2_VIEW_SIZES} px for DeepEncoder V2 (the sides with a learned "
                         f"query bank: 144 and 256 queries), got {image_size!r}")
    return image_size


def v2_view_tokens(image_size: int) -> int:
    """Tokens of one V2 view: its n queries, n = (S / 64)^2 (144 at 768, 256 at 1024)."""
    return compressed_grid(check_v2_view_size(image_size)) ** 2


# --- test tolerances, per dtype: (atol, rtol). Read by the tests and the benchmarks. ---------
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
