"""accelerate(): upstream-structured DeepEncoder code (DeepSeek's and vLLM's shapes) routed through
the package's ops in place, reversibly, with the same parameters and the same outputs."""
import pytest
import torch

import deepencoder_kernels as dk
from conftest import assert_close
from upstream import RelPosAttention, UpstreamDeepEncoder, VllmClipAttention


def randomised(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if ("rel_pos" in name or "pos" in name or "class" in name or "bias" in name) else 0.2)
    return model.eval()


@pytest.fixture(params=["deepseek", "vllm"])
def model(request):
    if request.param == "deepseek":
        return randomised(UpstreamDeepEncoder())
    return randomised(UpstreamDeepEncoder(clip_attention=VllmClipAttention, sam_attention=RelPosAttention))


PIXELS = torch.randn(2, 3, 128, 128)   # an 8 x 8 SAM grid: 4 x 4 windows, a 2 x 2 compressed grid


@pytest.mark.parametrize("device,backend,dtype", [
    ("cpu", "reference", torch.float32), ("cpu", "triton-interpret", torch.float32),
    # fp32 on CUDA too: end to end in half precision these stand-ins' outputs (|x| up to ~14) differ from
    # upstream's by more than the per-op tolerances (2 half ulps of big values; measured in the
    # interpreter); the kernels' half-precision numerics are tested per op at the real shapes
    pytest.param("cuda", "triton", torch.float32, marks=pytest.mark.gpu)])
def test_outputs_match_and_parameters_are_shared(model, device, backend, dtype):
    model.to(device, dtype)
    pixels = PIXELS.to(device, dtype)
    with torch.no_grad():
        want = model(pixels)
    params_before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    report = dk.accelerate(model)
    assert report.count("sam block") == 3 and report.count("sam encoder") == 1 and report.count("clip attention") == 2
    assert [e.kind for e in report.left_alone] == ["projector"]
    with torch.no_grad(), dk.backend(backend):
        got = model(pixels)
    used = {op: c.backend for op, c in dk.last_backends().items()}
    assert used["rel_pos_attention"] == used["compress"] == used["varlen_attention"] == backend
    assert got.device == want.device and got.dtype == dtype
    assert_close(got, want, dtype)
    after = model.state_dict()
    assert list(after) == list(params_before)
    for k, v in after.items():
        assert v.data_ptr() == params_before[k][0] and torch.equal(v, params_before[k][1]), k


def test_checkpoint_loads_after_accelerate_and_restore_undoes_it(model):
    other = randomised(type(model)() if not isinstance(model.vision_model.layers[0].self_attn, VllmClipAttention)
                       else UpstreamDeepEncoder(clip_attention=VllmClipAttention, sam_attention=RelPosAttention), seed=1)
    with torch.no_grad():
        want_other = other(PIXELS)
    dk.accelerate(model)
    model.load_state_dict(other.state_dict())          # weights loaded into the patched model are used
    with torch.no_grad():
        assert_close(model(PIXELS), want_other, torch.float32)
    assert dk.restore(model) == 6
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(PIXELS), other(PIXELS))    # the original code path, bit for bit


def test_context_manager_and_report_text(model):
    with dk.accelerated(model) as report:
        assert "sam_model.blocks.0: sam block (forward)" in str(report)
        assert "projector: one Linear" in str(report)
        assert dk.accelerate(model).patched == []          # idempotent: a second call patches nothing
    assert dk.restore(model) == 0


def test_parts_left_alone_say_why():
    from upstream import UpstreamAttention

    attn = UpstreamAttention(64, 1, (4, 4))
    report = dk.accelerate(attn)
    assert report.patched == [] and "block holds the window size" in report.left_alone[0].why
    attn.use_rel_pos = False
    block = UpstreamDeepEncoder().sam_model.blocks[0]
    block.attn.use_rel_pos = False
    assert "use_rel_pos=False" in dk.accelerate(block).left_alone[0].why
    own = dk.accelerate(dk.DeepEncoder(
        sam=dk.modules.SamEncoder(dim=64, depth=1, num_heads=1, global_blocks=(), neck_dim=16, out_dim=32),
        clip=dk.modules.ClipVisionModel(dim=32, depth=1, num_heads=2, hidden=64), projector=dk.modules.MlpProjector(64, 24)))
    assert own.patched == [] and all("already on the package's ops" in e.why or e.kind == "projector" for e in own.left_alone)


@pytest.mark.parametrize("backend", ["reference", "triton-interpret"])
def test_accelerated_encoder_compiles_fullgraph(model, backend):
    """torch.compile(fullgraph=True) traces the accelerated model with no graph break (the fused ops
    are custom ops with fake implementations; the reference runs as plain torch ops) and gives the
    same output. aot_eager: a compile backend that runs on this CPU-only machine."""
    with torch.no_grad():
        want = model(PIXELS)
    dk.accelerate(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), dk.backend(backend):
        got = compiled(PIXELS)
    assert_close(got, want, torch.float32)


@pytest.mark.gpu
def test_accelerated_encoder_compiles_fullgraph_with_inductor_on_cuda(model):
    """The accelerated stand-in under torch.compile(fullgraph=True) with the default backend (inductor)
    on CUDA, the fused ops compiled Triton."""
    model.to("cuda")
    pixels = PIXELS.cuda()
    with torch.no_grad():
        want = model(pixels)
    dk.accelerate(model)
    torch._dynamo.reset()
    with torch.no_grad(), dk.backend("triton"):
        got = torch.compile(model, fullgraph=True)(pixels)
    assert_close(got, want, torch.float32)


# ---- never silent: look-alikes left alone say what was looked for and what was found ------------


def test_look_alikes_are_reported_with_what_was_looked_for_and_found():
    import torch.nn as nn
    from upstream import UpstreamAttention

    attn = UpstreamAttention(64, 1, (4, 4))
    (e,) = dk.accelerate(attn).left_alone
    assert e.kind == "sam attention" and "window_size" in e.looked_for and e.found.startswith("UpstreamAttention(qkv=Linear")
    block = UpstreamDeepEncoder().sam_model.blocks[0]
    block.ls1 = nn.Linear(64, 64)     # timm's LayerScale slot holding something the fused block would skip
    (e,) = dk.accelerate(block).left_alone
    assert e.kind == "sam block" and "ls1=Linear" in e.why and "ls1=Linear" in e.found
    del block.ls1
    del block.window_size
    (e,) = dk.accelerate(block).left_alone
    assert "lacks window_size" in e.why and "window_size" in e.looked_for
    enc = UpstreamDeepEncoder()
    enc.sam_model.neck[2] = nn.Conv2d(16, 16, 3, padding=1, bias=True)   # a conv bias DeepEncoder's neck has not
    report = dk.accelerate(enc)
    (e,) = [e for e in report.left_alone if e.kind == "sam encoder"]
    assert "differ from DeepEncoder's" in e.why and "bias=True" in e.found
    assert report.count("sam block") == 3 and report.count("sam encoder") == 0
    text = str(report)
    assert "left alone:" in text and "looked for:" in text and "found:" in text


# ---- never slower ---------------------------------------------------------------------------------


def test_never_slower_where_nothing_is_faster(model):
    """Under backend 'auto' on this CPU the attention ops have a path faster than upstream's code
    (``sdpa-blocked``) and the compressor has none: the SAM blocks and CLIP attentions run the ops, the
    SAM encoder keeps its original forward (its neck bit for bit, no compress op runs) and the report
    says so."""
    from deepencoder_kernels import dispatch

    with torch.no_grad():
        want = model(PIXELS)
    report = dk.accelerate(model)
    assert len(report.original_here) == 1
    assert "on cpu (torch.float32)" in report.original_here[0] and "no compress faster" in report.original_here[0]
    assert "1 sam encoder" in report.original_here[0] and "sam block" not in report.original_here[0]
    dispatch.clear_last_backends()
    with torch.no_grad():
        got = model(PIXELS)
    assert {op: c.backend for op, c in dk.last_backends().items()} == {"rel_pos_attention": "sdpa-blocked",
                                                                       "varlen_attention": "sdpa-blocked"}
    assert_close(got, want, torch.float32)


def test_a_faster_backend_under_auto_runs_the_ops(model, monkeypatch):
    from deepencoder_kernels import dispatch

    with torch.no_grad():
        want = model(PIXELS)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton-interpret", "reference"))
    report = dk.accelerate(model)
    assert report.original_here == []
    with torch.no_grad():
        got = model(PIXELS)
    assert {c.backend for c in dk.last_backends().values()} == {"triton-interpret"}
    assert_close(got, want, torch.float32)


# ---- exact after any weight update ----------------------------------------------------------------

# 160 px: a 10 x 10 SAM grid (windows padded to 12: the padded keys are the qkv bias), the global block's
# 15-row tables resized to 19 rows, a 3 x 3 compressed grid: every derived tensor a kernel reads


def _new_weights(model, seed):
    fresh = randomised(type(model)() if not isinstance(model.vision_model.layers[0].self_attn, VllmClipAttention)
                       else UpstreamDeepEncoder(clip_attention=VllmClipAttention, sam_attention=RelPosAttention), seed=seed)
    return fresh.state_dict()


def _write(model, state, how):
    params = dict(model.named_parameters())
    if how == "load_state_dict":
        model.load_state_dict(state)
    elif how == "data.copy_":
        for k, p in params.items():
            p.data.copy_(state[k])
    elif how == "data =":
        for k, p in params.items():
            p.data = state[k].clone()
    elif how == "optimizer step":
        opt = torch.optim.SGD(params.values(), lr=1.0)
        for k, p in params.items():
            p.grad = p.detach() - state[k]          # one step of lr 1 lands on the new weights
        opt.step()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["load_state_dict", "optimizer step", "data.copy_", "data ="])
def test_exact_after_every_weight_write(model, how):
    pixels = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("triton-interpret"):
        model(pixels)                                  # the fused path has run on the old weights
    state = _new_weights(model, seed=7)
    _write(model, state, how)
    oracle = type(model)() if not isinstance(model.vision_model.layers[0].self_attn, VllmClipAttention) else \
        UpstreamDeepEncoder(clip_attention=VllmClipAttention, sam_attention=RelPosAttention)
    oracle.load_state_dict(state)
    with torch.no_grad():
        want = oracle.eval()(pixels)
        with dk.backend("triton-interpret"):
            got = model(pixels)
    assert {c.backend for c in dk.last_backends().values()} == {"triton-interpret"}
    assert_close(got, want, torch.float32, msg=how)


@pytest.mark.gpu
def test_exact_after_data_writes_on_cuda(model):
    """The stale-weights case as it appeared (vLLM's weight loaders write with .data.copy_): on the compiled kernels."""
    model.cuda()
    pixels = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(5)).cuda()
    dk.accelerate(model)
    with torch.no_grad(), dk.backend("triton"):
        model(pixels)
    state = {k: v.cuda() for k, v in _new_weights(model, seed=7).items()}
    _write(model, state, "data.copy_")
    oracle = type(model)() if not isinstance(model.vision_model.layers[0].self_attn, VllmClipAttention) else \
        UpstreamDeepEncoder(clip_attention=VllmClipAttention, sam_attention=RelPosAttention)
    oracle.load_state_dict(state)
    with torch.no_grad():
        want = oracle.cuda().eval()(pixels)
        with dk.backend("triton"):
            got = model(pixels)
    assert_close(got, want, torch.float32)


def test_a_backend_declared_not_faster_keeps_the_original(model, monkeypatch):
    """``faster_than_upstream`` on a backend (a bool or ``(device, dtype) -> bool``) decides, not its name:
    here the interpreter is 'auto''s first choice but declared not faster for rel_pos_attention, so the SAM
    blocks keep their own code while the other parts run the ops."""
    import dataclasses

    from deepencoder_kernels import dispatch

    declared = [dataclasses.replace(b, faster_than_upstream=lambda device, dtype: False) if b.name == "triton-interpret" else b
                for b in dispatch._REGISTRY["rel_pos_attention"]]
    monkeypatch.setitem(dispatch._REGISTRY, "rel_pos_attention", declared)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton-interpret", "reference"))
    with torch.no_grad():
        want = model(PIXELS)
    report = dk.accelerate(model)
    assert len(report.original_here) == 1 and "rel_pos_attention" in report.original_here[0]
    assert "3 sam block" in report.original_here[0] and "compress" not in report.original_here[0]
    dispatch.clear_last_backends()
    with torch.no_grad():
        got = model(PIXELS)
    assert {op: c.backend for op, c in dk.last_backends().items()} == {"compress": "triton-interpret",
                                                                       "varlen_attention": "triton-interpret"}
    assert_close(got, want, torch.float32)
