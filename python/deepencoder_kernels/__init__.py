"""deepencoder-kernels: fused GPU kernels for DeepEncoder, the vision encoder of DeepSeek-OCR."""
from . import config, ops, reference
from .accelerate import AccelerationReport, accelerate, accelerated, restore
from .checkpoint import load_checkpoint
from .dispatch import available, backend, clear_last_backends, last_backends
from .modules import DeepEncoder, DeepEncoderV2
from .preprocess import preprocess, render_document_page, token_count

__version__ = "0.1.0"
__all__ = [
    "AccelerationReport", "DeepEncoder", "DeepEncoderV2", "accelerate", "accelerated", "restore", "available", "backend", "clear_last_backends", "config", "last_backends",
    "load_checkpoint", "ops", "preprocess", "reference", "render_document_page", "token_count",
]
