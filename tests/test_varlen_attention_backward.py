"""The fused varlen attention backward (Triton interpreter on CPU) against autograd through the
reference: q/k/v as strided views of one packed qkv, with and without the per-sequence rel-pos
bias (tables, resize included), empty sequences, fp32 and bf16."""
import importlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from conftest import assert_close, by_device, fused_backend


def make_inputs(lens, heads, d, dtype, grids=None, table_rows=None):
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    qkv = (torch.randn(total, 3, heads, d) * 0.5).to(dtype)
    bias = {}
    if grids is not None:
        side = max(max(g) for g in grids)
        rows = table_rows or 2 * side - 1
        bias = dict(rel_pos_h=(torch.randn(rows, d) * 0.3).to(dtype), rel_pos_w=(torch.randn(rows, d) * 0.3).to(dtype),
                    grid_hw=torch.tensor(grids, dtype=torch.int32).view(-1, 2))
    return qkv, cu, bias


def run(qkv, cu, bias, max_seqlen, dout, fused: bool, check_values=True):
    """Gradients for the packed qkv (q, k, v are its strided views) and the tables."""
    qkv = qkv.detach().clone().requires_grad_()
    tables = {k: (t.detach().clone().requires_grad_() if k != "grid_hw" else t) for k, t in bias.items()}
    if fused:
        q, k, v = qkv.unbind(1)
        backend = fused_backend(qkv.device)
        with dk.backend(backend):
            out = dk.ops.varlen_attention(q, k, v, cu, max_seqlen, allow_empty=True, check_values=check_values, **tables)
        assert dk.last_backends()["varlen_attention"].backend == backend
    else:
        q, k, v = qkv.float().unbind(1)
        ft = {k: (t.float() if k != "grid_hw" else t) for k, t in tables.items()}
        out = ref.varlen_attention(q, k, v, cu, max_seqlen, None, ft.get("rel_pos_h"), ft.get("rel_pos_w"), ft.get("grid_hw"))
    inputs = [qkv] + [tables[k] for k in ("rel_pos_h", "rel_pos_w") if k in tables]
    return out, torch.autograd.grad(out, inputs, dout.to(out.dtype))


def check(lens, heads, d, dtype, grids=None, table_rows=None, check_values=True, device="cpu"):
    qkv, cu, bias = make_inputs(lens, heads, d, dtype, grids, table_rows)
    qkv, cu, bias = qkv.to(device), cu.to(device), {k: t.to(device) for k, t in bias.items()}
    dout = torch.randn(sum(lens), heads, d).to(device, dtype)
    _, got = run(qkv, cu, bias, max(lens), dout, True, check_values)
    _, want = run(qkv, cu, bias, max(lens), dout, False)
    for name, g, w in zip(("dqkv", "d rel_pos_h", "d rel_pos_w"), got, want):
        scale = max(1.0, w.abs().max().item())
        assert g.shape == w.shape
        assert_close(g.float() / scale, w / scale, dtype, msg=f"lens={lens} grids={grids} {dtype}: {name}")
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device,case", by_device(
    [("plain",), ("rel_pos",)],
    [("clip",), ("clip-batch8",), ("sam-global-mixed",)]), ids=None)
def test_gradients_at_real_shapes(device, case, dtype):
    """CUDA: CLIP's packed views (65/101/257/401 tokens, 16 heads of 64) and SAM global blocks of a mixed
    batch (grids 32/40/64/80 with rel-pos, 12 heads of 64); CPU: one small case of each kind."""
    if case == "plain":
        check([5, 17, 9], 2, 16, dtype, device=device)
    elif case == "rel_pos":
        check([12, 20], 2, 16, dtype, grids=[(3, 4), (4, 5)], device=device)
    elif case.startswith("clip"):
        check([65, 101, 257, 401] * (2 if case == "clip-batch8" else 1), 16, 64, dtype, device=device)
    else:
        check([s * s for s in (32, 40, 64, 80)], 12, 64, dtype, grids=[(s, s) for s in (32, 40, 64, 80)], device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_gradients(dtype):
    """CLIP-style: no bias; partial q/key tiles, a one-token sequence, lengths past one tile."""
    check([70, 1, 9], 2, 16, dtype)


def test_plain_gradients_with_empty_sequences():
    check([0, 5, 0, 9, 3, 0], 2, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rel_pos_gradients(dtype):
    """SAM global blocks of packed grids: each sequence its own grid and resized tables."""
    check([20, 12, 1, 6], 2, 16, dtype, grids=[(4, 5), (3, 4), (1, 1), (2, 3)])


def test_rel_pos_gradients_resize_and_empty():
    """Tables of another length (resized per side, differentiably) and an empty sequence."""
    check([6, 0, 12], 1, 16, torch.float32, grids=[(2, 3), (1, 1), (3, 4)], table_rows=5, check_values=False)


def test_rel_pos_real_head_dim():
    """d = 64 and a grid whose tables need two 64-row chunks (LP 128: sides up to 40)."""
    check([80, 9], 1, 64, torch.bfloat16, grids=[(2, 40), (3, 3)])


def test_backward_is_deterministic():
    qkv, cu, bias = make_inputs([12, 7], 2, 16, torch.bfloat16, grids=[(3, 4), (1, 7)])
    dout = torch.randn(19, 2, 16).to(torch.bfloat16)
    first = run(qkv, cu, bias, 12, dout, True)[1]
    second = run(qkv, cu, bias, 12, dout, True)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_compiled_training_step_traces():
    qkv, cu, bias = make_inputs([6, 4], 1, 16, torch.float32, grids=[(2, 3), (2, 2)])

    def loss(qkv, th, tw):
        q, k, v = qkv.unbind(1)
        out = dk.ops.varlen_attention(q, k, v, cu, 6, rel_pos_h=th, rel_pos_w=tw, grid_hw=bias["grid_hw"], max_side=3,
                                      check_values=False)
        return (out * out).sum()

    torch._dynamo.reset()
    grads = []
    with dk.backend("triton-interpret"):
        for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
            xs = [t.detach().clone().requires_grad_() for t in (qkv, bias["rel_pos_h"], bias["rel_pos_w"])]
            fn(*xs).backward()
            grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert a is not None
        assert_close(a, b)


def test_opcheck():
    mod = importlib.import_module("deepencoder_kernels.ops.varlen_attention")
    qkv, cu, bias = make_inputs([4, 2], 1, 16, torch.float32, grids=[(2, 2), (1, 2)])
    q, k, v = (t.requires_grad_() for t in qkv.clone().unbind(1))
    tables = [torch.cat([ref.resize_rel_pos(bias[n], 2 * s - 1) for s in (1, 2)]).requires_grad_() for n in ("rel_pos_h", "rel_pos_w")]
    torch.library.opcheck(mod._varlen_attention_train_op, (q, k, v, cu, 4, None, *tables, bias["grid_hw"], 2, None, None, None,
                                                         "triton-interpret"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_dq_programs_launch_in_slices(monkeypatch):
    """With the bias, past DQ_PROGRAMS programs the dq kernel launches in slices (bounded table
    partials, reduced per side after each); forced here: 2 sequences x 2 q tiles x 2 heads, slices of 3."""
    from deepencoder_kernels.kernels import varlen_attention_backward as bwd

    monkeypatch.setattr(bwd, "DQ_PROGRAMS", 3)
    check([20, 12], 2, 16, torch.float32, grids=[(4, 5), (3, 4)])


def test_clip_full_width():
    """CLIP's width (16 heads of 64) on two short packed sequences."""
    check([10, 5], 16, 64, torch.bfloat16)
