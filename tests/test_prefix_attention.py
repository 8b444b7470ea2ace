"""The fused varlen attention on DeepEncoder V2's causal-flow stage: prefix-LM mask (``prefix_lens``),
grouped-query attention and RoPE on load, forward and gradients, against the one oracle
(``reference.varlen_attention``) in float64. Tolerance: FlashAttention's rule, the fused error at
most twice the reference's own error in the same dtype (plus ``config.TOLERANCES``' absolute
tolerance as a floor), so fp32, fp16 and bf16 are judged alike.

In Triton's interpreter on CPU at small shapes that still hit every edge (prefix 0 and = length,
length 1, odd lengths, prefixes inside and on tile boundaries, GQA 1 / 2 / 7, RoPE on and off, V2's
288- and 512-token sequences at d = 64); compiled on CUDA (``pytest -m gpu``) at the real shapes
(14 query heads, 2 kv heads, d = 64, 288- and 512-token views packed)."""
import importlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from deepencoder_kernels.kernels.configs import VARLEN_ATTENTION, VARLEN_ATTENTION_BWD
from conftest import by_device, fused_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THETA = 1e6   # Qwen2's (V2's) RoPE base
BLOCK_N = VARLEN_ATTENTION["prefix"]["BLOCK_N"]
BLOCK_M = VARLEN_ATTENTION["prefix"]["BLOCK_M"]


def cu_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make(lengths, prefixes, heads, kv_heads, d, dtype, rope, device="cpu", nan_margin=False):
    """q [total, heads, d], k/v [total, kv_heads, d] (views inside NaN-filled storage with
    ``nan_margin``: a read past a sequence, head or channel shows), cu_seqlens, prefix_lens and the
    RoPE tables as V2 makes them (in the activation dtype), or None."""
    total = sum(lengths)
    parts = [torch.randn(total, h, d) * 0.7 for h in (heads, kv_heads, kv_heads)]
    if nan_margin:
        out = []
        for t in parts:
            big = torch.full((total + 5, t.shape[1] + 1, d + 8), float("nan"))
            big[:total, :t.shape[1], :d] = t
            out.append(big.to(device, dtype)[:total, :t.shape[1], :d])
        q, k, v = out
    else:
        q, k, v = (t.to(device, dtype) for t in parts)
    pl = None if prefixes is None else torch.tensor(prefixes, dtype=torch.int32, device=device)
    tables = ref.rope_tables(max(lengths) + 3, d, THETA, dtype, device) if rope else (None, None)
    return q, k, v, cu_of(lengths, device), pl, tables


def call(q, k, v, cu, max_seqlen, pl, tables, backend, **kwargs):
    with dk.backend(backend):
        out = dk.ops.varlen_attention(q, k, v, cu, max_seqlen, prefix_lens=pl, rope_cos=tables[0], rope_sin=tables[1], **kwargs)
    assert dk.last_backends()["varlen_attention"].backend == backend
    return out


def oracle(q, k, v, cu, max_seqlen, pl, tables, dtype=torch.float64, **kwargs):
    """The reference with q/k/v in ``dtype`` (float64: the truth; the inputs' dtype: the reference's own error)."""
    return ref.varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, max_seqlen, prefix_lens=pl, rope_cos=tables[0],
                                rope_sin=tables[1], **kwargs)


def within_2x_reference_error(got, truth, same_dtype, dtype, what=""):
    """FlashAttention's rule: max |fused - truth| <= 2 max |reference in dtype - truth|, plus the
    package's absolute tolerance for the dtype (``config.TOLERANCES``) scaled by max |truth| as a
    floor (where the reference happens to be nearly exact, e.g. fp32 on a CPU)."""
    from deepencoder_kernels import config

    got, truth, same_dtype = got.double(), truth.double(), same_dtype.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - truth).abs().max().item()
    ref_err = (same_dtype - truth).abs().max().item()
    bound = 2 * ref_err + config.TOLERANCES[dtype][0] * max(truth.abs().max().item(), 1.0)
    assert err <= bound, f"{what} {dtype}: fused error {err:.3g} > 2 x reference error {ref_err:.3g} + tolerance ({bound:.3g})"


def check_forward(lengths, prefixes, heads, kv_heads, d, dtype, rope, device="cpu"):
    q, k, v, cu, pl, tables = make(lengths, prefixes, heads, kv_heads, d, dtype, rope, device, nan_margin=True)
    L = max(lengths)
    got = call(q, k, v, cu, L, pl, tables, fused_backend(device))
    assert got.shape == q.shape and got.dtype == dtype
    within_2x_reference_error(got, oracle(q, k, v, cu, L, pl, tables), oracle(q, k, v, cu, L, pl, tables, dtype), dtype,
                              f"lengths={lengths} prefixes={prefixes} heads={heads}/{kv_heads} rope={rope}")


# lengths around the tiles (odd, 1, multiples +- 1) and prefixes 0, = length, on and inside tile edges
EDGE_LENGTHS = [1, 7, BLOCK_N, BLOCK_M + 1, 2 * BLOCK_M + 3, 97]
EDGE_PREFIXES = [1, 0, BLOCK_N, BLOCK_M, BLOCK_M + 2, 33]


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_edges(dtype, rope):
    """GQA 7:1 (V2's ratio) over lengths and prefixes at every tile edge."""
    check_forward(EDGE_LENGTHS, EDGE_PREFIXES, 7, 1, 16, dtype, rope)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (7, 1)], ids=["gqa1", "gqa2", "gqa7"])
def test_forward_gqa_ratios(heads, kv_heads):
    check_forward([19, 70, 1], [19, 40, 0], heads, kv_heads, 32, torch.float32, True)


def test_forward_without_prefix_is_bidirectional_with_gqa_and_rope():
    """prefix_lens None: every key visible (the CLIP path), GQA and RoPE still fused."""
    check_forward([5, 70, 33], None, 4, 2, 16, torch.float16, True)


@pytest.mark.parametrize("device,dtype,heads,kv_heads,views", by_device(
    [(torch.bfloat16, 2, 1, 1)],                                       # V2 lengths at d = 64, one head group
    [(dt, 14, 2, b) for dt in (torch.bfloat16, torch.float16, torch.float32) for b in (1, 4)],
    ids=lambda c: f"{str(c[0]).removeprefix('torch.')}-{c[1]}x{c[2]}-b{c[3]}"))
def test_forward_v2_views(device, dtype, heads, kv_heads, views):
    """DeepEncoder V2's packs: a 1024 global view (256 image tokens + 256 queries) with 768 tiles
    (144 + 144), prefix = n image tokens; ``views`` pages of 2 tiles + a global each."""
    lengths, prefixes = [288, 288, 512] * views, [144, 144, 256] * views
    check_forward(lengths, prefixes, heads, kv_heads, 64, dtype, True, device)


@pytest.mark.filterwarnings("ignore:All-NaN slice")   # the later rows do see the NaN keys
def test_skipped_key_tiles_are_never_read():
    """Causal rows (prefix 0) of the first q tile never load later key tiles: NaN there (which a
    masked-but-loaded tile would spread through P @ V) leaves their outputs finite and right."""
    n = 2 * BLOCK_M
    q, k, v, cu, pl, tables = make([n], [0], 2, 1, 16, torch.float32, True)
    k, v = k.clone(), v.clone()
    k[BLOCK_M:] = float("nan")
    v[BLOCK_M:] = float("nan")
    got = call(q, k, v, cu, n, pl, tables, "triton-interpret")
    first = slice(0, BLOCK_M)
    assert torch.isfinite(got[first]).all()
    want = oracle(q[first], k[first], v[first], cu_of([BLOCK_M]), BLOCK_M, pl, tables)
    within_2x_reference_error(got[first], want, want, torch.float32, "first q tile")


# ---- gradients ----------------------------------------------------------------------------------

def grads(q, k, v, cu, max_seqlen, pl, tables, dout, backend=None, dtype=None, **kwargs):
    """(out, dq, dk, dv) of the fused backend (``backend``) or of the reference in ``dtype``."""
    xs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    if backend is None:
        out = ref.varlen_attention(*xs, cu, max_seqlen, prefix_lens=pl, rope_cos=tables[0], rope_sin=tables[1], **kwargs)
    else:
        out = call(*xs, cu, max_seqlen, pl, tables, backend, **kwargs)
    return (out, *torch.autograd.grad(out, xs, dout.to(out.dtype)))


def check_gradients(lengths, prefixes, heads, kv_heads, d, dtype, rope, device="cpu"):
    q, k, v, cu, pl, tables = make(lengths, prefixes, heads, kv_heads, d, dtype, rope, device)
    L = max(lengths)
    dout = torch.randn(q.shape, device=device).to(dtype)
    got = grads(q, k, v, cu, L, pl, tables, dout, fused_backend(device))
    truth = grads(q, k, v, cu, L, pl, tables, dout, dtype=torch.float64)
    same = grads(q, k, v, cu, L, pl, tables, dout, dtype=dtype)
    for name, g, t, s in zip(("out", "dq", "dk", "dv"), got, truth, same):
        assert g.shape == t.shape and g.dtype == dtype, name
        within_2x_reference_error(g, t, s, dtype, f"{name} lengths={lengths} prefixes={prefixes} heads={heads}/{kv_heads} rope={rope}")


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_edges(dtype, rope):
    check_gradients([1, 37, BLOCK_M + 1, 70], [0, 37, BLOCK_N, 33], 7, 1, 16, dtype, rope)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)], ids=["gqa1", "gqa2"])
def test_gradients_gqa_ratios(heads, kv_heads):
    check_gradients([45, 1, 70], [44, 1, 0], heads, kv_heads, 16, torch.float32, True)


@pytest.mark.parametrize("device,dtype,heads,kv_heads,views", by_device(
    [(torch.bfloat16, 2, 1, 1)],
    [(dt, 14, 2, b) for dt in (torch.bfloat16, torch.float32) for b in (1, 4)],
    ids=lambda c: f"{str(c[0]).removeprefix('torch.')}-{c[1]}x{c[2]}-b{c[3]}"))
def test_gradients_v2_views(device, dtype, heads, kv_heads, views):
    lengths, prefixes = [288, 512] * views, [144, 256] * views
    check_gradients(lengths, prefixes, heads, kv_heads, 64, dtype, True, device)


def test_backward_is_deterministic():
    """dk/dv sum a kv head's query group in one program, in a fixed order: bit-identical reruns."""
    q, k, v, cu, pl, tables = make([40, 70], [20, 35], 7, 1, 16, torch.bfloat16, True)
    dout = torch.randn(q.shape).to(torch.bfloat16)
    first = grads(q, k, v, cu, 70, pl, tables, dout, "triton-interpret")
    second = grads(q, k, v, cu, 70, pl, tables, dout, "triton-interpret")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_rel_pos_with_prefix_gqa_and_rope():
    """Every argument at once (the kernel composes them; the reference defines the bias on the rotated q)."""
    grids = [(3, 4), (5, 5), (1, 1)]
    lengths = [h * w for h, w in grids]
    q, k, v, cu, pl, tables = make(lengths, [5, 25, 0], 4, 2, 16, torch.float32, True)
    bias = dict(rel_pos_h=torch.randn(9, 16) * 0.3, rel_pos_w=torch.randn(9, 16) * 0.3,
                grid_hw=torch.tensor(grids, dtype=torch.int32))
    dout = torch.randn(q.shape)
    got = grads(q, k, v, cu, 25, pl, tables, dout, "triton-interpret", **bias)
    truth = grads(q, k, v, cu, 25, pl, tables, dout, dtype=torch.float64,
                  **{n: (t.double() if t.is_floating_point() else t) for n, t in bias.items()})
    same = grads(q, k, v, cu, 25, pl, tables, dout, dtype=torch.float32, **bias)
    for name, g, t, s in zip(("out", "dq", "dk", "dv"), got, truth, same):
        within_2x_reference_error(g, t, s, torch.float32, name)


def test_rope_tables_that_require_grad_go_to_the_reference():
    """The fused backward gives no table gradients: auto picks the reference, a forced fused backend says why."""
    q, k, v, cu, pl, (cos, sin) = make([9], [4], 2, 1, 16, torch.float32, True)
    cos = cos.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="rope_cos / rope_sin require grad"):
        call(q, k, v, cu, 9, pl, (cos, sin), "triton-interpret")
    with torch.no_grad():
        call(q, k, v, cu, 9, pl, (cos, sin), "triton-interpret")   # no autograd: the fused forward serves it


def test_opcheck():
    mod = importlib.import_module("deepencoder_kernels.ops.varlen_attention")
    q, k, v, cu, pl, (cos, sin) = make([6, 3], [2, 3], 4, 2, 16, torch.float32, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(mod._varlen_attention_train_op, (q, k, v, cu, 6, None, None, None, None, 0, pl, cos, sin, "triton-interpret"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_training_step_traces():
    """torch.compile(fullgraph=True) over a training step with GQA, prefix_lens and RoPE: the
    forward and backward custom ops trace; gradients equal eager's."""
    q, k, v, cu, pl, (cos, sin) = make([9, 14], [4, 0], 4, 2, 16, torch.float32, True)

    def loss(q, k, v):
        out = dk.ops.varlen_attention(q, k, v, cu, 14, prefix_lens=pl, rope_cos=cos, rope_sin=sin, check_values=False)
        return (out * out).sum()

    torch._dynamo.reset()
    results = []
    with dk.backend("triton-interpret"):
        for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
            xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            fn(*xs).backward()
            results.append([x.grad for x in xs])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---- DeepEncoder V2 on the fused backend ----------------------------------------------------------

def small_v2_for_fused_kernels():
    """conftest's narrow DeepEncoderV2 with head dim 16 (the fused kernels take 16..128): GQA 4/2."""
    from deepencoder_kernels.modules import CausalFlowEncoder
    from conftest import small_encoder_v2

    enc = small_encoder_v2()
    torch.manual_seed(1)
    enc.qwen2_model = CausalFlowEncoder(dim=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden=48)
    with torch.no_grad():
        for name, p in enc.qwen2_model.named_parameters():
            if p.dim() <= 2 and "weight" not in name or "query_" in name:
                p.normal_(0, 0.5)
    return enc.eval()


def synthetic_page(size, seed):
    """Text-like strokes on paper (no personal data)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (250, 248, 240))
    draw = ImageDraw.Draw(img)
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        x, y = (int(torch.randint(0, s - 20, (1,), generator=g)) for s in size)
        draw.rectangle((x, y, x + 15, y + 3), fill=(20, 20, 20))
    return img


def fused_causal_flow(name, tokens_in=0, tokens_out=0):
    """A stage hook (``stages.py``): the causal-flow stage on the fused Triton backend (interpreted),
    the trunk, compressor and projector on the reference (what is tested here is the causal flow;
    the other kernels have their own tests, and interpreting the trunk would take minutes)."""
    return dk.backend("triton-interpret" if name == "causal flow" else "reference")


def test_v2_packed_batch_equals_page_by_page_on_the_fused_backend():
    """A page with no tiles (one 512-token sequence) and a 2-tile page (two 288-token sequences and a
    512) in one packed pass: every causal-flow layer one fused launch for all four views, equal to
    each page alone, and to the reference backend."""
    enc = small_v2_for_fused_kernels()
    pages = [synthetic_page((700, 500), 1), synthetic_page((1536, 768), 2)]
    dk.clear_last_backends()
    packed = enc.encode_batch(pages, "dynamic", stage=fused_causal_flow)
    assert dk.last_backends()["varlen_attention"].backend == "triton-interpret"
    alone = [enc.encode(p, "dynamic", stage=fused_causal_flow)[0] for p in pages]
    with dk.backend("reference"):
        want = enc.encode_batch(pages, "dynamic")
    assert dk.last_backends()["varlen_attention"].backend == "reference"
    assert [p.shape[0] for p in packed] == [257, 545]
    for p, a, w in zip(packed, alone, want):
        torch.testing.assert_close(p, a, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(p, w, atol=1e-4, rtol=1e-4)
