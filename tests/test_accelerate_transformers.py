"""accelerate() on transformers' own classes (5.24: native ``sam`` and ``deepseek_ocr2``, and DeepSeek-OCR
v1's port layout), small random weights built from configs: recognition, outputs against the original in
Triton's interpreter, the contracts (return types, hidden states and attention weights through
transformers' output-capturing decorators), the mask decoder and language model untouched, restore
bit for bit, fullgraph compile."""
import importlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import dispatch
from conftest import assert_close
import hf_models as hf

acc = importlib.import_module("deepencoder_kernels.accelerate")   # the package's `accelerate` is the function

PIXELS = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _fresh_record():
    dispatch.clear_last_backends()   # what ran is recorded per thread: not the previous test's calls


def patched_modules(model):
    return {p for p, m in model.named_modules() if acc._PATCH in m.__dict__}


def params_of(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def assert_same_params(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k


# ---- transformers' SamModel: the trunk's layers, never the neck alone, the mask decoder or prompts ----


def test_sam_model_layers_patched_rest_untouched_and_said_so():
    model = hf.sam_model()
    report = dk.accelerate(model)
    assert report.kinds() == {"sam block": 3}
    assert [p.path for p in report.patched] == [f"vision_encoder.layers.{i}" for i in range(3)]
    (neck,) = [e for e in report.left_alone if e.kind == "sam encoder"]
    assert neck.path == "vision_encoder" and "no stride-2 compressor" in neck.why
    assert "net_2 + net_3, or proj.conv1 + proj.conv2" in neck.looked_for and "neck=SamVisionNeck" in neck.found
    assert patched_modules(model) == {f"vision_encoder.layers.{i}" for i in range(3)}   # nothing in mask_decoder / prompt_encoder
    text = str(report)
    assert "vision_encoder.layers.0: sam block (forward)" in text and "looked for:" in text and "found:" in text


@pytest.mark.parametrize("backend", ["reference", "triton-interpret"])
def test_sam_model_outputs_contracts_and_restore(backend):
    model = hf.sam_model()
    with torch.no_grad():
        want = model.vision_encoder(PIXELS, output_hidden_states=True)
        want_emb = model.get_image_embeddings(PIXELS)
    before = params_of(model)
    dk.accelerate(model)
    with torch.no_grad(), dk.backend(backend):
        got = model.vision_encoder(PIXELS, output_hidden_states=True)
        got_emb = model.get_image_embeddings(PIXELS)
        tuple_out = model.vision_encoder(PIXELS, return_dict=False)
    assert dk.last_backends()["rel_pos_attention"].backend == backend
    assert type(got) is type(want) and isinstance(tuple_out, tuple)
    assert_close(got.last_hidden_state, want.last_hidden_state, torch.float32)
    assert_close(got_emb, want_emb, torch.float32)
    assert len(got.hidden_states) == len(want.hidden_states) == 4   # the decorators captured every layer
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert_close(g, w, torch.float32)
    assert_same_params(model, before)
    assert dk.restore(model) == 3
    with torch.no_grad():
        assert torch.equal(model.vision_encoder(PIXELS).last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sam_attention_weights_asked_for_run_the_original(attn):
    """output_attentions=True: eager returns the weights (the original runs for that call, bit for bit);
    SDPA returns none, as its original does."""
    model = hf.sam_model(attn)
    with torch.no_grad():
        want = model.vision_encoder(PIXELS, output_attentions=True)
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("triton-interpret"):
        got = model.vision_encoder(PIXELS, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == (3 if attn == "eager" else 0)
    assert all(torch.equal(g, w) for g, w in zip(got.attentions, want.attentions))
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


# ---- transformers' DeepseekOcr2ForConditionalGeneration ------------------------------------------


def test_ocr2_recognised_language_model_untouched():
    model = hf.ocr2_model()
    text_attn = model.config.text_config._attn_implementation
    report = dk.accelerate(model)
    assert report.kinds() == {"causal flow": 1, "sam encoder": 1, "sam block": 3}
    flow = next(p for p in report.patched if p.kind == "causal flow")
    assert flow.path == "model.vision_tower.vision_encoder" and "AttentionInterface" in flow.via
    assert next(p for p in report.patched if p.kind == "sam encoder").via == "forward (decorators kept)"
    assert [(e.path, e.kind) for e in report.left_alone] == [("model.multi_modal_projector", "projector")]
    assert not report.corrected
    assert model.config.vision_config.encoder_config._attn_implementation == acc.ATTN_IMPL
    assert model.config.text_config._attn_implementation == text_attn
    assert not any(p.startswith(("model.language_model", "lm_head")) for p in patched_modules(model))
    assert dk.restore(model) == 7   # 3 layers, the SAM encoder, the stack's forward, its 2 attentions' routing
    assert model.config.vision_config.encoder_config._attn_implementation == "sdpa"


def test_ocr2_image_features_match_and_keep_their_contract():
    model = hf.ocr2_model()
    with torch.no_grad():
        want = model.model.get_image_features(PIXELS, output_hidden_states=True)
    before = params_of(model)
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("reference"):
        got = model.model.get_image_features(PIXELS, output_hidden_states=True)
    assert {c.backend for c in dk.last_backends().values()} == {"reference"}
    assert set(dk.last_backends()) == {"rel_pos_attention", "compress", "varlen_attention"}
    assert type(got) is type(want)
    assert_close(got.last_hidden_state, want.last_hidden_state, torch.float32)
    for g, w in zip(got.pooler_output, want.pooler_output):
        assert_close(g, w, torch.float32)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert_close(g, w, torch.float32)
    assert_same_params(model, before)
    dk.restore(model)
    with torch.no_grad():
        assert torch.equal(model.model.get_image_features(PIXELS).last_hidden_state, want.last_hidden_state)


def test_ocr2_sam_half_on_the_fused_kernels():
    model = hf.ocr2_model()
    enc = model.model.vision_tower.sam_encoder
    with torch.no_grad():
        want = enc(PIXELS, output_hidden_states=True)
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("triton-interpret"):
        got = enc(PIXELS, output_hidden_states=True)
    assert {op: c.backend for op, c in dk.last_backends().items()} == {"rel_pos_attention": "triton-interpret",
                                                                       "compress": "triton-interpret"}
    assert type(got) is type(want) and got.last_hidden_state.shape == (2, 64, 2, 2)
    assert_close(got.last_hidden_state, want.last_hidden_state, torch.float32)
    assert len(got.hidden_states) == 4


def test_ocr2_causal_flow_on_the_fused_kernel():
    why = hf.fused_varlen_refusal(4, 2, 16, prefix=True)
    if why:
        pytest.skip(f"the fused varlen kernel refuses the causal-flow call yet ({why}); the reference path is tested above")
    model = hf.ocr2_model()
    with torch.no_grad():
        want = model.model.vision_tower(PIXELS).last_hidden_state
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("triton-interpret"):
        got = model.model.vision_tower(PIXELS).last_hidden_state
    assert dk.last_backends()["varlen_attention"].backend == "triton-interpret"
    assert_close(got, want, torch.float32)


def test_ocr2_attention_weights_asked_for_run_the_original():
    """Eager attention with output_attentions: the routed attentions run transformers' eager function with
    the prefix-LM mask transformers would build (no varlen call), so the weights come back; fed the same
    input (the vision encoder alone) they equal the original's bit for bit."""
    model = hf.ocr2_model("eager")
    tower = model.model.vision_tower
    with torch.no_grad():
        want = tower(PIXELS, output_attentions=True)
        embeds = torch.randn(2, 4 + 144, 64)
        want_enc = tower.vision_encoder(embeds, num_patches=4, output_attentions=True)
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("reference"):
        got = tower(PIXELS, output_attentions=True)
        assert set(dk.last_backends()) == {"compress"}   # SAM's layers and the attentions: their original code
        got_enc = tower.vision_encoder(embeds, num_patches=4, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    for g, w in zip(got.attentions, want.attentions):   # the SAM tail ran the op: inputs differ by rounding
        assert_close(g, w, torch.float32)
    assert all(torch.equal(g, w) for g, w in zip(got_enc.attentions, want_enc.attentions))
    assert torch.equal(got_enc.last_hidden_state, want_enc.last_hidden_state)


def test_ocr2_and_sam_never_slower_on_cpu():
    """Under backend 'auto' on this CPU only paths faster than upstream's code run: the attentions take the
    sdpa-blocked backend, the compressor (no faster CPU path) keeps its original forward, the report says so,
    and the outputs stay those of the unaccelerated model."""
    for model, run, has_compressor in (
            (hf.ocr2_model(), lambda m: m.model.get_image_features(PIXELS).last_hidden_state, True),
            (hf.sam_model(), lambda m: m.get_image_embeddings(PIXELS), False)):
        with torch.no_grad():
            want = run(model)
        report = dk.accelerate(model)
        if has_compressor:
            (why,) = report.original_here
            assert "on cpu (torch.float32)" in why and "no compress faster" in why
        else:   # SAM alone: its attentions have a faster path here, nothing keeps its original forward
            assert report.original_here == []
        dispatch.clear_last_backends()
        with torch.no_grad():
            got = run(model)
        assert dk.last_backends() and {c.backend for c in dk.last_backends().values()} == {"sdpa-blocked"}
        assert "compress" not in dk.last_backends()
        assert_close(got, want, torch.float32)


# ---- DeepSeek-OCR v1's port layout ----------------------------------------------------------------


def test_v1_port_layout():
    model = hf.v1_port()
    with torch.no_grad():
        want = model(PIXELS)
    report = dk.accelerate(model)
    assert report.kinds() == {"sam encoder": 1, "sam block": 3, "clip attention": 2}
    assert {p.via for p in report.patched if p.kind == "clip attention"} == {"AttentionInterface"}
    assert [p.path for p in report.patched if p.kind == "clip attention"] == [
        f"vision_tower.clip_encoder.encoder.layers.{i}.self_attn" for i in range(2)]
    for backend in ("reference", "triton-interpret"):
        with torch.no_grad(), dk.backend(backend):
            got = model(PIXELS)
        assert {c.backend for c in dk.last_backends().values()} == {backend}
        assert_close(got, want, torch.float32, msg=backend)
    dk.restore(model)
    with torch.no_grad():
        assert torch.equal(model(PIXELS), want)


# ---- look-alikes left alone, with what was looked for and what was found ------------------------


def test_ocr2_unsupported_attention_implementation_is_left_alone():
    model = hf.ocr2_model()
    model.config.vision_config.encoder_config._attn_implementation = "flex_attention"
    report = dk.accelerate(model)
    (e,) = [e for e in report.left_alone if e.kind == "causal flow"]
    assert "'flex_attention'" in e.why and e.found == "config._attn_implementation = 'flex_attention'"
    assert report.count("causal flow") == 0 and report.count("sam block") == 3


def test_ocr2_config_shared_outside_the_stack_is_left_alone():
    model = hf.ocr2_model()
    lm_attn = model.model.language_model.layers[0].self_attn
    lm_attn.config = model.model.vision_tower.vision_encoder.config   # a text attention sharing the stack's config
    report = dk.accelerate(model)
    (e,) = [e for e in report.left_alone if e.kind == "causal flow"]
    assert "shared with attentions outside the stack" in e.why and "language_model.layers.0.self_attn" in e.found
    assert model.config.vision_config.encoder_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("compile_backend", ["reference", "triton-interpret"])
def test_transformers_models_compile_fullgraph(compile_backend):
    """torch.compile(fullgraph=True) through transformers' decorators and the AttentionInterface."""
    model = hf.ocr2_model()
    target = model.model.vision_tower if compile_backend == "reference" else model.model.vision_tower.sam_encoder
    with torch.no_grad():
        want = target(PIXELS, output_hidden_states=True)
    dk.accelerate(model)
    torch._dynamo.reset()
    compiled = torch.compile(target, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), dk.backend(compile_backend):
        got = compiled(PIXELS, output_hidden_states=True)
    assert_close(got.last_hidden_state, want.last_hidden_state, torch.float32)
    assert len(got.hidden_states) == len(want.hidden_states)


def test_ocr2_vision_encoder_accelerated_on_its_own():
    """accelerate() on the causal-flow stack itself (no query banks above it): recognised by its structure."""
    model = hf.ocr2_model()
    enc = model.model.vision_tower.vision_encoder
    embeds = torch.randn(2, 4 + 144, 64)
    with torch.no_grad():
        want = enc(embeds, num_patches=4).last_hidden_state
    report = dk.accelerate(enc)
    assert report.kinds() == {"causal flow": 1}
    with torch.no_grad(), dk.backend("reference"):
        got = enc(embeds, num_patches=4).last_hidden_state
    assert dk.last_backends()["varlen_attention"].backend == "reference"
    assert_close(got, want, torch.float32)


@pytest.mark.gpu
def test_ocr2_on_cuda_under_auto():
    """On CUDA 'auto' has the fused kernels: every part runs them (the causal flow on whatever the varlen
    dispatcher takes for its prefix-LM call); fp32 end to end (bf16 is tested per op at real shapes)."""
    model = hf.ocr2_model().to("cuda")
    pixels = PIXELS.cuda()
    with torch.no_grad():
        want = model.model.get_image_features(pixels, output_hidden_states=True)
    report = dk.accelerate(model)
    assert report.original_here == []
    with torch.no_grad():
        got = model.model.get_image_features(pixels, output_hidden_states=True)
    used = {op: c.backend for op, c in dk.last_backends().items()}
    assert used["rel_pos_attention"] == used["compress"] == "triton" and "varlen_attention" in used
    assert_close(got.last_hidden_state, want.last_hidden_state, torch.float32)
    assert len(got.hidden_states) == len(want.hidden_states)
