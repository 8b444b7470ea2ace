"""Thin nn.Modules with DeepSeek-OCR's parameter names; their math goes through ``ops``."""
from .clip import ClipAttention, ClipVisionModel
from .encoder import DeepEncoder, MlpProjector
from .saccade import SaccadeSelector
from .sam import Compressor, RelPosAttention, SamBlock, SamEncoder

__all__ = ["ClipAttention", "ClipVisionModel", "Compressor", "DeepEncoder", "MlpProjector", "RelPosAttention",
           "SaccadeSelector", "SamBlock", "SamEncoder"]
