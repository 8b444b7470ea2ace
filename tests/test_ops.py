"""The ops layer: argument checks, the dispatcher, and the registered custom ops."""
import os

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import dispatch, ops, reference


def _attn_args(B=1, H=5, W=5, heads=2, d=8):
    return dict(qkv=torch.randn(B, H, W, 3 * heads * d), rel_pos_h=torch.randn(9, d), rel_pos_w=torch.randn(9, d),
                num_heads=heads, window_size=3, pad_kv=torch.randn(3 * heads * d))


@pytest.mark.parametrize("change,error,match", [
    (dict(qkv=[1.0]), TypeError, "qkv must be a torch.Tensor"),
    (dict(qkv=torch.randn(5, 5, 48)), ValueError, r"qkv must be 4-D, got shape \(5, 5, 48\)"),
    (dict(qkv=torch.randn(1, 5, 5, 48, dtype=torch.float64)), TypeError, "qkv must have dtype in"),
    (dict(qkv=torch.randn(1, 5, 5, 47)), ValueError, "qkv's last dim must be 3 \\* num_heads"),
    (dict(qkv=torch.randn(1, 0, 5, 48)), ValueError, "non-empty"),
    (dict(num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(num_heads=2.0), TypeError, "num_heads must be an int"),
    (dict(window_size=-1), ValueError, "window_size must be >= 0"),
    (dict(rel_pos_h=torch.randn(9, 7)), ValueError, r"rel_pos_h must have shape \[\*, 8\], got \[9, 7\]"),
    (dict(rel_pos_w=torch.randn(9, 8, device="meta")), ValueError, "rel_pos_w must be on cpu"),
    (dict(pad_kv=torch.randn(47)), ValueError, r"pad_kv must have shape \[48\]"),
])
def test_rel_pos_attention_rejects_bad_input(change, error, match):
    args = {**_attn_args(), **change}
    with pytest.raises(error, match=match):
        ops.rel_pos_attention(**args)


def _compress_args(cin=12, cn=8, c2=6, c3=10):
    return dict(x=torch.randn(1, 8, 8, cin), neck0_w=torch.randn(cn, cin, 1, 1), neck1_w=torch.randn(cn),
                neck1_b=torch.randn(cn), neck2_w=torch.randn(cn, cn, 3, 3), neck3_w=torch.randn(cn),
                neck3_b=torch.randn(cn), net2_w=torch.randn(c2, cn, 3, 3), net3_w=torch.randn(c3, c2, 3, 3))


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(8, 8, 12)), ValueError, "x must be 4-D"),
    (dict(x=torch.randn(1, 8, 8, 11)), ValueError, r"neck0_w must have shape \[8, 11, 1, 1\]"),
    (dict(neck1_b=torch.randn(7)), ValueError, r"neck1_b must have shape \[8\]"),
    (dict(neck2_w=torch.randn(8, 8, 1, 1)), ValueError, r"neck2_w must have shape \[8, 8, 3, 3\]"),
    (dict(net3_w=torch.randn(10, 5, 3, 3)), ValueError, r"net3_w must have shape \[10, 6, 3, 3\]"),
    (dict(net2_w=torch.randn(6, 8, 3, 3, dtype=torch.float16)), TypeError, "net2_w must have dtype in"),
    (dict(eps=0.0), ValueError, "eps must be a positive float"),
])
def test_compress_rejects_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        ops.compress(**{**_compress_args(), **change})


def _varlen_args():
    q = torch.randn(10, 2, 8)
    return dict(q=q, k=torch.randn_like(q), v=torch.randn_like(q),
                cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=6)


@pytest.mark.parametrize("change,error,match", [
    (dict(k=torch.randn(10, 2, 7)), ValueError, r"k must have shape \[10, \*, 8\]"),
    (dict(k=torch.randn(10, 3, 8)), ValueError, "k has 3 heads, which must divide q's 2 heads"),
    (dict(k=torch.randn(10, 1, 8)), ValueError, r"v must have shape \[10, 1, 8\]"),
    (dict(prefix_lens=torch.tensor([1, 2])), TypeError, "prefix_lens must have dtype in"),
    (dict(prefix_lens=torch.tensor([1], dtype=torch.int32)), ValueError, r"prefix_lens must have shape \[2\]"),
    (dict(prefix_lens=torch.tensor([5, 2], dtype=torch.int32)), ValueError, r"prefix_lens\[0\] = 5 must be in \[0, sequence length 4\]"),
    (dict(prefix_lens=torch.tensor([0, -1], dtype=torch.int32)), ValueError, r"prefix_lens\[1\] = -1 must be in"),
    (dict(rope_cos=torch.randn(6, 8)), ValueError, "rope_cos and rope_sin must be given together"),
    (dict(rope_cos=torch.randn(5, 8), rope_sin=torch.randn(5, 8)), ValueError, "rope_cos has 5 positions, fewer than max_seqlen=6"),
    (dict(rope_cos=torch.randn(6, 4), rope_sin=torch.randn(6, 4)), ValueError, r"rope_cos must have shape \[\*, 8\]"),
    (dict(rope_cos=torch.randn(6, 8), rope_sin=torch.ones(6, 8, dtype=torch.int64)), TypeError, "rope_sin must have dtype in"),
    (dict(v=torch.randn(10, 2, 8, dtype=torch.float16)), TypeError, "v must have dtype in"),
    (dict(cu_seqlens=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens must have dtype in \\['torch.int32'\\]"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "num_seqs \\+ 1 >= 2"),
    (dict(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, r"cu_seqlens\[0\] must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing; sequence 1"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"cu_seqlens\[-1\] must equal the packed token count 10"),
    (dict(max_seqlen=5), ValueError, "max_seqlen=5 is smaller than the longest sequence \\(6\\)"),
    (dict(max_seqlen=-1), ValueError, "max_seqlen must be >= 0"),
    (dict(rel_pos_h=torch.randn(3, 8)), ValueError, "must be given together"),
    (dict(rel_pos_h=torch.randn(3, 8), rel_pos_w=torch.randn(3, 8), grid_hw=torch.tensor([[2, 2], [2, 2]], dtype=torch.int32)),
     ValueError, r"grid_hw\[1\] = \(2, 2\) must be positive with h \* w = sequence length 6"),
])
def test_varlen_attention_rejects_bad_input(change, error, match):
    args = {**_varlen_args(), **change}
    with pytest.raises(error, match=match):
        ops.varlen_attention(**args)


@pytest.mark.parametrize("change,error,match", [
    (dict(k=-1), ValueError, r"k\[0\] = -1 is out of range"),
    (dict(k=9), ValueError, r"k\[0\] = 9 is out of range: each k must be in \[0, N_b = 8\]"),
    (dict(k=torch.tensor([1, 2, 3])), ValueError, r"k must have shape \[2\]"),
    (dict(k=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "k must have dtype in"),
    (dict(k=1.5), TypeError, "k must be an int or an int64 tensor"),
    (dict(features=torch.randn(2, 7, 4)), ValueError, r"features must have shape \[2, 8, \*\]"),
    (dict(scores=torch.randn(2, 8, dtype=torch.float64)), TypeError, "scores must have dtype in"),
    (dict(order="random"), ValueError, "order must be one of"),
    (dict(scores=torch.randn(16)), ValueError, r"scores must be \[B, N\] without cu_seqlens"),
])
def test_saccade_gather_rejects_bad_input(change, error, match):
    args = {**dict(scores=torch.randn(2, 8), features=torch.randn(2, 8, 4), k=3), **change}
    with pytest.raises(error, match=match):
        ops.saccade_gather(**args)


def test_saccade_gather_packed_mismatched_lengths():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"features must have shape \[12, \*\]"):
        ops.saccade_gather(torch.randn(12), torch.randn(11, 4), 2, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"k\[0\] = 6 is out of range"):
        ops.saccade_gather(torch.randn(12), torch.randn(12, 4), torch.tensor([6, 1]), cu_seqlens=cu)
    out, pos, cu_out = ops.saccade_gather(torch.randn(12), torch.randn(12, 4), torch.tensor([5, 0]), cu_seqlens=cu)
    assert out.shape == (5, 4) and cu_out.tolist() == [0, 5, 5]


def test_dispatch_records_and_explains():
    dk.clear_last_backends()
    ops.rel_pos_attention(**_attn_args())
    choice = dk.last_backends()["rel_pos_attention"]
    assert choice.backend == "sdpa-blocked"   # auto on CPU: the blocked SDPA before the reference
    with dk.backend("reference"):
        assert dispatch.requested_kind() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        with dk.backend("cuda-magic"):
            pass
    with dk.backend("cpp"):
        with pytest.raises(RuntimeError, match=r"no backend can run rel_pos_attention[\s\S]*cpp: no such backend"):
            ops.rel_pos_attention(**_attn_args())


def test_backend_env_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.requested_kind() == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="DEEPENCODER_KERNELS_BACKEND"):
        dispatch.requested_kind()


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and dispatcher registration of every op, via the reference."""
    a = _attn_args()
    torch.library.opcheck(torch.ops.deepencoder_kernels.rel_pos_attention,
                          (a["qkv"], a["rel_pos_h"], a["rel_pos_w"], 2, 3, a["pad_kv"], "reference"))
    c = _compress_args()
    torch.library.opcheck(torch.ops.deepencoder_kernels.compress, (*c.values(), 1e-6, "reference"))
    v = _varlen_args()
    torch.library.opcheck(torch.ops.deepencoder_kernels.varlen_attention,
                          (v["q"], v["k"], v["v"], v["cu_seqlens"], 6, None, None, None, None, 0, None, None, None, "reference"))
    kv = torch.randn(10, 1, 8)   # GQA 2:1, the prefix-LM mask and RoPE (DeepEncoder V2's causal flow)
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    torch.library.opcheck(torch.ops.deepencoder_kernels.varlen_attention,
                          (v["q"], kv, kv.clone(), v["cu_seqlens"], 6, None, None, None, None, 0,
                           torch.tensor([2, 3], dtype=torch.int32), cos, sin, "reference"))
    torch.library.opcheck(torch.ops.deepencoder_kernels.saccade_gather,
                          (torch.randn(2, 8), torch.randn(2, 8, 4), torch.tensor([3, 1]), None, False, -1, "reference"),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_reference_backend_keeps_autograd():
    a = _attn_args()
    a["qkv"].requires_grad_(True)
    ops.rel_pos_attention(**a).sum().backward()
    assert a["qkv"].grad is not None and a["qkv"].grad.abs().sum() > 0


def test_cpp_extension_is_built():
    """setup.py builds csrc/ through CMakeLists.txt with ninja; the module must import."""
    from deepencoder_kernels import _C

    info = _C.build_info()
    assert info["cplusplus"] >= 201703 and info["compiler"]
