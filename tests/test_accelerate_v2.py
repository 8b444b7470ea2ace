"""accelerate() on DeepSeek-OCR 2's own code and vLLM's port (stand-ins written to their structure,
``upstream.UpstreamDeepEncoderV2``: SAM, then ``qwen2_model`` over transformers' real ``Qwen2Model``):
the causal-flow stage on the prefix-LM GQA varlen op (no mask, no host read), DeepSeek's code corrected
under transformers >= 4.53, restore bit for bit, fullgraph compile, weight writes, look-alikes reported."""
import importlib

import pytest
import torch
import torch.nn as nn

import deepencoder_kernels as dk
from deepencoder_kernels import dispatch
from conftest import assert_close
from test_accelerate import randomised
import hf_models as hf
from upstream import Qwen2Decoder2Encoder, UpstreamDeepEncoderV2

acc = importlib.import_module("deepencoder_kernels.accelerate")
PIXELS = {4: torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(4)),    # 2 x 2 tokens: query_768's bank
          9: torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(5))}    # 3 x 3: query_1024's


@pytest.fixture(autouse=True)
def _fresh_record():
    dispatch.clear_last_backends()


def pair(seed=0):
    """DeepSeek's code and vLLM's port holding the same weights."""
    deepseek = randomised(UpstreamDeepEncoderV2("deepseek"), seed)
    vllm = UpstreamDeepEncoderV2("vllm").eval()
    vllm.load_state_dict(deepseek.state_dict())
    return deepseek, vllm


def test_stand_ins_reproduce_upstream_behaviour():
    """Under transformers 5.24 DeepSeek's mask hook is never called (causal image tokens); vLLM's port
    passes the prefix-LM mask: the two differ by far more than rounding."""
    deepseek, vllm = pair()
    with torch.no_grad():
        diff = (deepseek(PIXELS[4]) - vllm(PIXELS[4])).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("variant", ["deepseek", "vllm"])
def test_report(variant):
    model = pair()[0 if variant == "deepseek" else 1]
    report = dk.accelerate(model)
    assert report.kinds() == {"sam encoder": 1, "sam block": 3, "causal flow": 1}
    assert [p for p in report.patched if p.kind == "causal flow"] == [acc.Patched("qwen2_model", "causal flow", "forward")]
    assert [(e.path, e.kind) for e in report.left_alone] == [("projector", "projector")]
    if variant == "deepseek":
        ((path, what),) = report.corrected
        assert path == "qwen2_model" and "_update_causal_mask" in what and "never called" in what
        assert "corrected:" in str(report)
    else:
        assert report.corrected == []


@pytest.mark.parametrize("tokens", [4, 9])
@pytest.mark.parametrize("variant", ["deepseek", "vllm"])
def test_causal_flow_is_prefix_lm_and_restores(variant, tokens):
    """Both codebases, accelerated, give the prefix-LM result (vLLM's port's original output is the oracle:
    transformers' own Qwen2Model with the mask passed explicitly); restore gives the original bit for bit."""
    deepseek, vllm = pair()
    model = deepseek if variant == "deepseek" else vllm
    pixels = PIXELS[tokens]
    with torch.no_grad():
        oracle = vllm(pixels)
        original = model(pixels)
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("reference"):
        got = model(pixels)
    assert dk.last_backends()["varlen_attention"].backend == "reference"
    assert got.shape == (pixels.shape[0], tokens, 24)
    assert_close(got, oracle, torch.float32)
    assert dk.restore(model) == 5
    with torch.no_grad():
        assert torch.equal(model(pixels), original)


def test_deepseek_code_is_corrected_even_where_nothing_is_faster():
    """Under 'auto' on this CPU the compressor keeps its original forward (no faster path), the attentions run
    the faster-than-upstream CPU backend, and the correction makes DeepSeek's code give the prefix-LM result."""
    deepseek, vllm = pair()
    with torch.no_grad():
        oracle = vllm(PIXELS[4])
    report = dk.accelerate(deepseek)
    (why,) = report.original_here
    assert "no compress faster" in why and "1 sam encoder" in why and "causal flow" not in why
    dispatch.clear_last_backends()
    with torch.no_grad():
        got = deepseek(PIXELS[4])
    assert {op: c.backend for op, c in dk.last_backends().items()} == {
        "rel_pos_attention": "sdpa-blocked", "varlen_attention": "sdpa-blocked"}
    assert_close(got, oracle, torch.float32)
    dk.accelerate(vllm)   # vLLM's port is right already: it runs the same ops and keeps the same answer
    dispatch.clear_last_backends()
    with torch.no_grad():
        assert_close(vllm(PIXELS[4]), oracle, torch.float32)
    assert {c.backend for c in dk.last_backends().values()} == {"sdpa-blocked"}


def test_causal_flow_on_the_fused_kernel():
    why = hf.fused_varlen_refusal(4, 2, 16, prefix=True)
    if why:
        pytest.skip(f"the fused varlen kernel refuses the causal-flow call yet ({why}); the reference path is tested above")
    deepseek, vllm = pair()
    with torch.no_grad():
        oracle = vllm(PIXELS[4])
    dk.accelerate(deepseek)
    with torch.no_grad(), dk.backend("triton-interpret"):
        got = deepseek(PIXELS[4])
    assert {c.backend for c in dk.last_backends().values()} == {"triton-interpret"}
    assert_close(got, oracle, torch.float32)


def test_a_view_size_without_a_bank_is_a_clear_error():
    deepseek, _ = pair()
    dk.accelerate(deepseek)
    with torch.no_grad(), dk.backend("reference"), pytest.raises(ValueError, match="no query bank for 16 image tokens"):
        deepseek(torch.randn(1, 3, 256, 256))


def test_causal_flow_reads_nothing_to_the_host():
    from test_host_sync import no_host_sync

    deepseek, _ = pair()
    dk.accelerate(deepseek)
    feats = torch.randn(2, 64, 2, 2)
    with torch.no_grad(), dk.backend("reference"), no_host_sync():
        out = deepseek.qwen2_model(feats)
    assert out.shape == (2, 4, 64)


def test_compiles_fullgraph():
    deepseek, vllm = pair()
    with torch.no_grad():
        oracle = vllm(PIXELS[4])
    dk.accelerate(deepseek)
    torch._dynamo.reset()
    compiled = torch.compile(deepseek, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), dk.backend("reference"):
        got = compiled(PIXELS[4])
    assert_close(got, oracle, torch.float32)


@pytest.mark.parametrize("how", ["load_state_dict", "data.copy_", "data ="])
def test_exact_after_weight_writes(how):
    deepseek, _ = pair()
    dk.accelerate(deepseek)
    with torch.no_grad(), dk.backend("reference"):
        deepseek(PIXELS[4])
    _, new = pair(seed=3)
    state = new.state_dict()
    if how == "load_state_dict":
        deepseek.load_state_dict(state)
    else:
        for name, p in deepseek.named_parameters():
            if how == "data.copy_":
                p.data.copy_(state[name])
            else:
                p.data = state[name].clone()
    with torch.no_grad():
        want = new(PIXELS[4])
        with dk.backend("reference"):
            got = deepseek(PIXELS[4])
    assert_close(got, want, torch.float32, msg=how)


# ---- look-alikes ---------------------------------------------------------------------------------


def test_query_banks_without_a_usable_decoder_are_reported():
    d2e = Qwen2Decoder2Encoder("deepseek")
    d2e.model.model.config.use_sliding_window = True
    d2e.model.model.layers[1].self_attn.sliding_window = 8
    (e,) = dk.accelerate(d2e).left_alone
    assert e.kind == "causal flow" and "sliding window (8)" in e.why and "query_768" in e.looked_for
    bare = nn.Module()
    bare.query_768, bare.query_1024 = nn.Embedding(4, 8), nn.Embedding(9, 8)
    (e,) = dk.accelerate(bare).left_alone
    assert e.why == "no decoder stack under the query banks" and "Module(query_768=Embedding" in e.found


def test_mask_hook_detection():
    """Not a correction: a base class whose forward calls the hook (transformers <= 4.52), or a subclass
    passing its own mask mapping (vLLM's port)."""
    from upstream import _deepseek_inner_class, _qwen2_config, _vllm_inner_class

    cfg = _qwen2_config(16, 1, 2, 1, 32)
    assert acc._mask_hook_ignored(_deepseek_inner_class()(cfg)) is not None
    assert acc._mask_hook_ignored(_vllm_inner_class()(cfg)) is None

    class OldQwen2Model(nn.Module):   # transformers 4.46's shape: forward calls the hook
        def forward(self, inputs_embeds=None):
            return self._update_causal_mask(None, inputs_embeds, None, None, False)

    OldQwen2Model.__module__ = "transformers.models.qwen2.modeling_qwen2"

    class DeepseekOnOld(OldQwen2Model):
        def _update_causal_mask(self, *args):
            return None

    assert acc._mask_hook_ignored(DeepseekOnOld()) is None


@pytest.mark.gpu
def test_deepseek_v2_on_cuda_under_auto():
    deepseek, vllm = pair()
    deepseek, vllm = deepseek.cuda(), vllm.cuda()
    pixels = PIXELS[4].cuda()
    with torch.no_grad():
        oracle = vllm(pixels)
    report = dk.accelerate(deepseek)
    assert report.original_here == [] and report.corrected
    with torch.no_grad():
        got = deepseek(pixels)
    used = {op: c.backend for op, c in dk.last_backends().items()}
    assert used["rel_pos_attention"] == used["compress"] == "triton" and "varlen_attention" in used
    assert_close(got, oracle, torch.float32)
