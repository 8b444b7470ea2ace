"""The vLLM plugin against vLLM's real classes, where vLLM is installed (it needs a CUDA torch, so
not in the default CI install; on a GPU machine: ``pip install vllm`` into the venv, then
``pytest tests/test_vllm_real.py``). Never run in this repository's sessions (no vLLM here): the
stand-in tests (tests/test_vllm_plugin.py) cover the same paths without vLLM."""
import importlib
import importlib.metadata

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
