"""The vLLM plugin against vLLM's real classes, where vLLM is installed (it needs a CUDA torch, so
not in the default CI install; on a GPU machine: ``pip install vllm`` into the venv, then
``pytest tests/test_vllm_real.py``). Never run in this repository's sessions (no vLLM here): the
stand-in tests (tests/test_vllm_plugin.py) cover the same paths without vLLM."""
import importlib
import importlib.metadata
import importlib.util

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (it needs a CUDA torch): pip install vllm to run these")

import deepencoder_kernels as dk
from conftest import assert_close


def test_entry_point_loads_and_maps_the_architecture_to_a_subclass():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "deepencoder_kernels"]
    assert len(eps) == 1 and eps[0].value == "deepencoder_kernels.vllm_plugin:register"
    from vllm.plugins import load_general_plugins
    from vllm.model_executor.models import deepseek_ocr

    load_general_plugins()
    plugin = importlib.import_module("deepencoder_kernels.vllm_plugin")
    assert issubclass(plugin.DeepseekOCRForCausalLM, deepseek_ocr.DeepseekOCRForCausalLM)
    deepseek_ocr2 = importlib.util.find_spec("vllm.model_executor.models.deepseek_ocr2")
    if deepseek_ocr2 is not None:
        base = importlib.import_module("vllm.model_executor.models.deepseek_ocr2").DeepseekOCR2ForCausalLM
        assert issubclass(plugin.DeepseekOCR2ForCausalLM, base)


def test_real_sam_is_recognised_and_matches_vllms_forward():
    from vllm.model_executor.models.deepencoder import build_sam_vit_b

    torch.manual_seed(0)
    sam = build_sam_vit_b().eval()
    with torch.no_grad():
        for name, p in sam.named_parameters():
            p.normal_(0, 0.5 if ("rel_pos" in name or "pos_embed" in name or "bias" in name) else 0.02)
        pixels = torch.randn(1, 3, 512, 512)
        want = sam(pixels)
        report = dk.accelerate(sam)
        assert report.count("sam block") == 12 and report.count("sam encoder") == 1, report
        assert_close(sam(pixels), want, torch.float32)


def test_real_v2_decoder_is_recognised_and_matches_vllms_forward():
    """vLLM's DeepSeek-OCR 2 decoder-as-encoder (deepencoder2.py), small, random weights: the causal-flow
    stage on the prefix-LM op equals vLLM's forward (which passes the mask as a mapping)."""
    deepencoder2 = pytest.importorskip("vllm.model_executor.models.deepencoder2",
                                       reason="this vLLM has no DeepSeek-OCR 2 (vllm.model_executor.models.deepencoder2)")
    torch.manual_seed(0)
    d2e = deepencoder2.build_qwen2_decoder_as_encoder(decoder_layer=2, hidden_dimension=64, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128).eval()
    with torch.no_grad():
        for p in d2e.parameters():
            p.normal_(0, 0.1)
        feats = torch.randn(2, 64, 12, 12)   # 144 image tokens: query_768's bank
        want = d2e(feats)
        report = dk.accelerate(d2e)
        assert report.count("causal flow") == 1 and not report.corrected, report
        with dk.backend("reference"):
            assert_close(d2e(feats), want, torch.float32)
