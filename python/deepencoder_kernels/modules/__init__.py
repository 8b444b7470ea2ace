"""Thin nn.Modules with DeepSeek-OCR's parameter names; their math goes through ``ops``."""
from .clip import ClipAttention, ClipVisionModel
from .causal_flow import CausalFlowEncoder
from .encoder import DeepEncoder, DeepEncoderV2, MlpProjector
from .saccade import SaccadeSelector
from .sam import Compressor, RelPosAttention, SamBlock, SamEncoder

__all__ = ["CausalFlowEncoder", "ClipAttention", "ClipVisionModel", "Compressor", "DeepEncoder", "DeepEncoderV2", "MlpProjector", "RelPosAttention",
           "SaccadeSelector", "SamBlock", "SamEncoder"]
