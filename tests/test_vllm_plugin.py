"""The vLLM plugin and accelerate() on vLLM's DeepSeek-OCR layout, tensor parallelism included.

vLLM cannot be installed here (it needs a CUDA torch), so ``vllm_standins`` copies the module
tree, parameter names and call contracts of vLLM's ``deepseek_ocr.py`` / ``deepencoder.py`` /
``clip.py``, with tensor-parallel shards over torch.distributed; a fake ``vllm`` package written
per test exercises the plugin's registration path (current, absent, changed, opted out).
"""
import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import deepencoder_kernels as dk
from conftest import assert_close
import hf_models as hf
import vllm_standins as vs

ROOT = Path(__file__).resolve().parents[1]
PIXELS = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))   # 8 x 8 SAM grid, 2 x 2 for CLIP


def loaded_model(seed=0):
    model = vs.DeepseekOCRForCausalLM().eval()
    model.load_weights(vs.full_checkpoint(seed).items())
    return model


# ---- accelerate() on vLLM's layout (world size 1) ----------------------------------------------


@pytest.mark.parametrize("device,backends,dtype", [
    ("cpu", ("reference", "triton-interpret"), torch.float32),
    pytest.param("cuda", ("triton",), torch.float32, marks=pytest.mark.gpu),
    pytest.param("cuda", ("triton",), torch.bfloat16, marks=pytest.mark.gpu)])
def test_vllm_layout_single_rank_matches_and_keeps_contracts(device, backends, dtype):
    model = loaded_model().to(device, dtype)
    pixels = PIXELS.to(device, dtype)
    with torch.no_grad():
        want = model._encode_global_features(pixels)
    from deepencoder_kernels.vllm_plugin import accelerate_towers

    report = accelerate_towers(model)
    assert (report.count("sam block"), report.count("sam encoder"), report.count("clip attention")) == (3, 1, 2)
    assert not any(p.path.startswith("language_model") for p in report.patched)   # the LM's look-alike stays
    assert "forward" not in model.language_model.attn.__dict__
    attn = model.vision_model.transformer.layers[0].self_attn
    with torch.no_grad(), dk.backend(backends[0]):
        out = attn(hidden_states=torch.randn(2, 5, 64, device=device, dtype=dtype))   # by keyword; unpacked in two
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    for backend in backends:
        with torch.no_grad(), dk.backend(backend):
            got = model._encode_global_features(pixels)
        assert {c.backend for c in dk.last_backends().values()} == {backend}
        assert got.dtype == dtype
        assert_close(got, want, dtype, msg=backend)


def test_patched_forwards_read_nothing_back_to_the_host():
    """On the meta device any .item() / .tolist() / data-dependent shape raises: the patched
    forwards (and the ops' checks on the path they take) run there, so they add no host sync and
    allocate by shapes only, which is what vLLM's encoder CUDA graphs need."""
    from deepencoder_kernels.vllm_plugin import accelerate_towers

    model = loaded_model().to("meta")
    assert len(accelerate_towers(model).patched) == 6
    with torch.no_grad(), dk.backend("reference"):   # the patched path (under 'auto' the meta device has no faster one)
        out = model._encode_global_features(PIXELS.to("meta"))
    assert out.shape == (2, 4, 24) and out.device.type == "meta"
    probe = torch.zeros(2, device="meta")
    with pytest.raises(Exception):   # the meta device does refuse host reads
        probe.tolist()


def test_clip_attention_whose_returns_cannot_be_read_is_left_alone():
    attn = vs.CLIPAttention(64, 4)

    def forward(self, hidden_states):   # two contracts: nothing to mimic
        if hidden_states.dim() == 3:
            return hidden_states
        return hidden_states, hidden_states

    attn.__class__ = type("Mixed", (vs.CLIPAttention,), {"forward": forward})
    report = dk.accelerate(attn)
    assert report.patched == [] and "what it returns" in report.left_alone[0][2]
    attn.__class__ = vs.CLIPAttention
    attn.num_heads_per_partition = 5   # 3 * 64 outputs do not split into 5 heads
    assert "do not split" in dk.accelerate(attn).left_alone[0][2]


def loaded_v2(seed=0):
    model = vs.DeepseekOCR2ForCausalLM().eval()
    model.load_weights(vs.full_checkpoint(seed, "DeepseekOCR2ForCausalLM").items())
    return model


@pytest.mark.parametrize("backends", [("reference",), ("reference", "triton-interpret")])
def test_vllm_v2_layout_matches_and_leaves_the_language_model(backends):
    """DeepSeek-OCR 2 in vLLM's layout: SAM + compressor (to the decoder width) and the causal-flow stage."""
    if "triton-interpret" in backends:
        why = hf.fused_varlen_refusal(4, 2, 16, prefix=True)
        if why:
            pytest.skip(f"the fused varlen kernel refuses the causal-flow call yet ({why})")
    from deepencoder_kernels.vllm_plugin import accelerate_towers

    model = loaded_v2()
    with torch.no_grad():
        want = model._encode_global_features(PIXELS)
    report = accelerate_towers(model)
    assert report.kinds() == {"sam encoder": 1, "sam block": 3, "causal flow": 1}
    assert report.corrected == []                       # vLLM's port passes its mask: nothing to correct
    assert not any(p.path.startswith("language_model") for p in report.patched)
    assert "forward" not in model.language_model.attn.__dict__
    for backend in backends[-1:]:
        with torch.no_grad(), dk.backend(backend):
            got = model._encode_global_features(PIXELS)
        assert {c.backend for c in dk.last_backends().values()} == {backend}
        assert got.shape == want.shape == (2 * 4, 24)
        assert_close(got, want, torch.float32, msg=backend)


@pytest.mark.parametrize("arch", ["DeepseekOCRForCausalLM", "DeepseekOCR2ForCausalLM"])
def test_load_weights_again_is_exact(arch):
    """vLLM's load_weights called again (a reload, a trainer syncing weights into the server: its
    weight loaders write with param.data.copy_) after the fused path has run: the next call reads
    the new weights (the SAM parts on the fused kernels, the rest as the op allows here)."""
    from deepencoder_kernels.vllm_plugin import accelerate_towers

    model = vs.MODELS[arch]().eval()
    model.load_weights(vs.full_checkpoint(0, arch).items())
    accelerate_towers(model, arch)
    sam_backend = "triton-interpret"
    with torch.no_grad(), dk.backend(sam_backend):
        model.sam_model(PIXELS)
    model.load_weights(vs.full_checkpoint(1, arch).items())
    fresh = vs.MODELS[arch]().eval()
    fresh.load_weights(vs.full_checkpoint(1, arch).items())
    with torch.no_grad():
        want = fresh._encode_global_features(PIXELS)
        with dk.backend(sam_backend):
            sam = model.sam_model(PIXELS)
        with dk.backend("reference"):
            got = model._encode_global_features(PIXELS)
    assert_close(sam, fresh.sam_model(PIXELS), torch.float32)
    assert_close(got, want, torch.float32)


# ---- tensor parallelism: world size 2 on CPU (gloo), each process with its shards --------------


def test_tensor_parallel_shards_equal_the_unsharded_model(tmp_path):
    ckpt = vs.full_checkpoint()
    torch.save(ckpt, tmp_path / "ckpt.pt")
    torch.save(PIXELS, tmp_path / "pixels.pt")
    model = vs.DeepseekOCRForCausalLM().eval()
    model.load_weights(ckpt.items())
    with torch.no_grad():
        want = model._encode_global_features(PIXELS)
    backends = ("reference", "triton-interpret")
    mp.spawn(vs.tp_worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt.pt"), str(tmp_path / "pixels.pt"), str(tmp_path), backends))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["qkv_rows"] == 3 * 2 * 16                    # this rank holds 2 of the 4 heads
        assert_close(got["original"], want, torch.float32, msg=f"stand-in shards, rank {rank}")
        assert sum(k == "clip attention" for _, k in got["patched"]) == 2
        for name in backends:
            assert set(got[f"{name} ran"].values()) == {name}
            assert_close(got[name], want, torch.float32, msg=f"accelerated, rank {rank}, {name}")


def test_tensor_parallel_v2_every_rank_runs_the_replicated_towers(tmp_path):
    """DeepSeek-OCR 2's vision towers are replicated in vLLM: every rank accelerates and gets the whole result."""
    arch = "DeepseekOCR2ForCausalLM"
    ckpt = vs.full_checkpoint(0, arch)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    torch.save(PIXELS, tmp_path / "pixels.pt")
    with torch.no_grad():
        want = loaded_v2()._encode_global_features(PIXELS)
    mp.spawn(vs.tp_worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt.pt"), str(tmp_path / "pixels.pt"), str(tmp_path),
                   ("reference",), arch))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(got["original"], want, torch.float32, msg=f"rank {rank}")
        assert [k for _, k in got["patched"]].count("causal flow") == 1
        assert set(got["reference ran"].values()) == {"reference"}
        assert_close(got["reference"], want, torch.float32, msg=f"accelerated, rank {rank}")


# ---- the plugin's registration path, against a fake vllm package ------------------------------

FAKE_VLLM = '''
import importlib


class _Registry:
    def __init__(self, archs):
        self.models = {a: f"vllm.model_executor.models.{m}:{a}" for a, m in archs.items()}

    def get_supported_archs(self):
        return self.models.keys()

    def register_model(self, arch, cls):
        self.models[arch] = cls

    def resolve(self, arch):
        module, name = self.models[arch].split(":")
        return getattr(importlib.import_module(module), name)


ModelRegistry = _Registry(ARCHS)
'''

DEEPSEEK_OCR2 = {
    "current": "from vllm_standins import DeepseekOCR2ForCausalLM\n",
    "not a module class": "class DeepseekOCR2ForCausalLM:\n    pass\n",
}

DEEPSEEK_OCR = {
    "current": "from vllm_standins import DeepseekOCRForCausalLM\n",
    "not a module class": "class DeepseekOCRForCausalLM:\n    pass\n",
    "towers renamed": textwrap.dedent("""
        import vllm_standins as vs

        class DeepseekOCRForCausalLM(vs.DeepseekOCRForCausalLM):
            def __init__(self, **kw):
                super().__init__(**kw)
                self.vision_tower = self.sam_model
                del self.sam_model, self.vision_model
    """),
}


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """Writes a fake ``vllm`` (registry + model module) and returns the plugin module, fresh."""

    def make(archs=("DeepseekOCRForCausalLM", "DeepseekOCR2ForCausalLM", "LlamaForCausalLM"), deepseek_ocr="current",
             deepseek_ocr2="current"):
        pkg = tmp_path / "vllm"
        models = pkg / "model_executor" / "models"
        models.mkdir(parents=True)
        modules = {"DeepseekOCRForCausalLM": "deepseek_ocr", "DeepseekOCR2ForCausalLM": "deepseek_ocr2"}
        mapping = {a: modules.get(a, "llama") for a in archs}
        (pkg / "__init__.py").write_text(f"ARCHS = {mapping!r}\n" + FAKE_VLLM)
        (pkg / "model_executor" / "__init__.py").write_text("")
        (models / "__init__.py").write_text("")
        (models / "llama.py").write_text("class LlamaForCausalLM:\n    pass\n")
        if deepseek_ocr is not None:
            (models / "deepseek_ocr.py").write_text(DEEPSEEK_OCR[deepseek_ocr])
        if deepseek_ocr2 is not None:
            (models / "deepseek_ocr2.py").write_text(DEEPSEEK_OCR2[deepseek_ocr2])
        monkeypatch.syspath_prepend(str(tmp_path))
        import deepencoder_kernels.vllm_plugin as plugin

        return plugin

    forget = lambda: [sys.modules.pop(m) for m in list(sys.modules) if m == "vllm" or m.startswith("vllm.")
                      or m == "deepencoder_kernels.vllm_plugin"]
    forget()
    monkeypatch.delenv("DEEPENCODER_KERNELS_VLLM_PLUGIN", raising=False)
    yield make
    forget()


def test_entry_point_is_declared_and_resolves():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    module, func = eps["deepencoder_kernels"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_plugin_registers_a_subclass_that_accelerates_after_load(fake_vllm, caplog):
    plugin = fake_vllm()
    from vllm import ModelRegistry

    llama_before = ModelRegistry.models["LlamaForCausalLM"]
    assert plugin.register() is True
    assert ModelRegistry.models["LlamaForCausalLM"] == llama_before          # other models untouched
    cls = ModelRegistry.resolve("DeepseekOCRForCausalLM")
    assert issubclass(cls, vs.DeepseekOCRForCausalLM) and cls is not vs.DeepseekOCRForCausalLM
    assert cls.__name__ == "DeepseekOCRForCausalLM"
    import pickle

    assert pickle.loads(pickle.dumps(cls)) is cls     # by reference, as vLLM's and Ray's pickling need
    plugin._reported.clear()
    reference = loaded_model()
    with caplog.at_level(logging.DEBUG, logger="vllm.deepencoder_kernels"):
        model = cls(vllm_config=None, prefix="")
        model.load_weights(vs.full_checkpoint().items())
        model.load_weights(vs.full_checkpoint().items())   # a reload: idempotent, not reported again at INFO
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "3 sam block, 1 sam encoder, 2 clip attention patched" in info[0], info
    assert "forward" in model.vision_model.transformer.layers[0].self_attn.__dict__
    assert "forward" not in model.language_model.attn.__dict__
    with torch.no_grad():
        assert_close(model._encode_global_features(PIXELS), reference._encode_global_features(PIXELS), torch.float32)


def test_plugin_opt_out(fake_vllm, monkeypatch, caplog):
    plugin = fake_vllm()
    monkeypatch.setenv("DEEPENCODER_KERNELS_VLLM_PLUGIN", "0")
    from vllm import ModelRegistry

    before = dict(ModelRegistry.models)
    with caplog.at_level(logging.INFO, logger="vllm.deepencoder_kernels"):
        assert plugin.register() is False
    assert ModelRegistry.models == before
    assert "plugin off (DEEPENCODER_KERNELS_VLLM_PLUGIN=0)" in caplog.text


@pytest.mark.parametrize("case", ["arch absent", "module absent"])
def test_plugin_does_nothing_without_deepseek_ocr(fake_vllm, caplog, case):
    plugin = (fake_vllm(archs=("LlamaForCausalLM",)) if case == "arch absent"
              else fake_vllm(deepseek_ocr=None, deepseek_ocr2=None))
    from vllm import ModelRegistry

    before = dict(ModelRegistry.models)
    with caplog.at_level(logging.WARNING, logger="vllm.deepencoder_kernels"):
        assert plugin.register() is False
    assert ModelRegistry.models == before
    assert len(caplog.records) == 1 and "this vLLM has no DeepseekOCRForCausalLM" in caplog.text
    assert "no DeepseekOCR2ForCausalLM" in caplog.text


def test_plugin_without_a_registry_does_nothing(fake_vllm, caplog):
    plugin = fake_vllm()
    import vllm

    del vllm.ModelRegistry
    with caplog.at_level(logging.WARNING, logger="vllm.deepencoder_kernels"):
        assert plugin.register() is False
    assert "cannot read vLLM's model registry" in caplog.text


def test_plugin_with_a_changed_class_runs_vllms_code(fake_vllm, caplog):
    plugin = fake_vllm(deepseek_ocr="not a module class")
    from vllm import ModelRegistry

    assert plugin.register() is True
    with caplog.at_level(logging.WARNING, logger="vllm.deepencoder_kernels"):
        cls = ModelRegistry.resolve("DeepseekOCRForCausalLM")
    assert cls is sys.modules["vllm.model_executor.models.deepseek_ocr"].DeepseekOCRForCausalLM   # vLLM's own
    assert "changed (not an nn.Module with load_weights)" in caplog.text


def test_plugin_with_renamed_towers_patches_nothing(fake_vllm, caplog):
    plugin = fake_vllm(deepseek_ocr="towers renamed")
    from vllm import ModelRegistry

    plugin.register()
    cls = ModelRegistry.resolve("DeepseekOCRForCausalLM")
    model = cls()
    with caplog.at_level(logging.WARNING, logger="vllm.deepencoder_kernels"):
        model.load_weights((k, v) for k, v in vs.full_checkpoint().items()
                           if not k.startswith(("model.sam_model", "model.vision_model")))
    assert "has no sam_model / vision_model" in caplog.text
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_plugin_survives_a_failing_accelerate(fake_vllm, caplog, monkeypatch):
    plugin = fake_vllm()
    from vllm import ModelRegistry

    acc = sys.modules["deepencoder_kernels.accelerate"]   # the package's name `accelerate` is the function
    plugin.register()
    model = ModelRegistry.resolve("DeepseekOCRForCausalLM")()
    calls = []

    def failing(tower):
        calls.append(tower)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(tower)

    real = acc.accelerate
    monkeypatch.setattr(acc, "accelerate", failing)
    with caplog.at_level(logging.WARNING, logger="vllm.deepencoder_kernels"):
        model.load_weights(vs.full_checkpoint().items())
    assert "accelerate() failed (RuntimeError: boom)" in caplog.text
    assert not any("forward" in m.__dict__ for m in model.modules())   # the first tower was restored too


def test_plugin_serves_deepseek_ocr2(fake_vllm, caplog):
    plugin = fake_vllm()
    from vllm import ModelRegistry

    assert plugin.register() is True
    cls = ModelRegistry.resolve("DeepseekOCR2ForCausalLM")
    assert issubclass(cls, vs.DeepseekOCR2ForCausalLM) and cls.__name__ == "DeepseekOCR2ForCausalLM"
    assert ModelRegistry.resolve("DeepseekOCRForCausalLM") is not cls
    plugin._reported.clear()
    reference = loaded_v2()
    with caplog.at_level(logging.DEBUG, logger="vllm.deepencoder_kernels"):
        model = cls(vllm_config=None, prefix="")
        model.load_weights(vs.full_checkpoint(0, "DeepseekOCR2ForCausalLM").items())
        model.load_weights(vs.full_checkpoint(0, "DeepseekOCR2ForCausalLM").items())   # a reload: not reported again at INFO
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "DeepSeek-OCR 2 encoder on deepencoder_kernels ops" in info[0], info
    assert "3 sam block, 1 sam encoder, 1 causal flow patched" in info[0]
    assert "forward" in model.qwen2_model.__dict__ and "forward" not in model.language_model.attn.__dict__
    with torch.no_grad(), dk.backend("reference"):
        assert_close(model._encode_global_features(PIXELS), reference._encode_global_features(PIXELS), torch.float32)


def test_plugin_serves_v1_on_a_vllm_without_deepseek_ocr2(fake_vllm, caplog):
    plugin = fake_vllm(archs=("DeepseekOCRForCausalLM", "LlamaForCausalLM"), deepseek_ocr2=None)
    from vllm import ModelRegistry

    with caplog.at_level(logging.INFO, logger="vllm.deepencoder_kernels"):
        assert plugin.register() is True
    assert ModelRegistry.models["DeepseekOCRForCausalLM"] == "deepencoder_kernels.vllm_plugin:DeepseekOCRForCausalLM"
    assert "DeepseekOCR2ForCausalLM" not in ModelRegistry.models
    assert len(caplog.records) == 1 and "no DeepseekOCR2ForCausalLM (not in ModelRegistry)" in caplog.text


def test_plugin_with_a_changed_v2_class_runs_vllms_code(fake_vllm, caplog):
    plugin = fake_vllm(deepseek_ocr2="not a module class")
    from vllm import ModelRegistry

    assert plugin.register() is True
    with caplog.at_level(logging.WARNING, logger="vllm.deepencoder_kernels"):
        cls = ModelRegistry.resolve("DeepseekOCR2ForCausalLM")
    assert cls is sys.modules["vllm.model_executor.models.deepseek_ocr2"].DeepseekOCR2ForCausalLM
    assert "DeepseekOCR2ForCausalLM changed (not an nn.Module with load_weights)" in caplog.text
