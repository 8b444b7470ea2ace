"""The packed varlen attention kernel against per-sequence reference attention: in Triton's interpreter
on CPU at small shapes, compiled on CUDA (`pytest -m gpu`) at the real CLIP and packed SAM-global shapes."""
import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from conftest import assert_close, by_device, fused_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Real shapes. CLIP-large (16 heads of 64) over every mode's compressed grid + CLS (Tiny 65, Small and
# Gundam tiles 101, Base 257, Large 401 tokens); SAM's packed global blocks (12 heads of 64, [127, 64]
# tables resized per grid) over every mode's trunk grid (32 / 40 / 64 / 80). Batch 1, 8 and a mix.
CLIP_LENGTHS = [65, 101, 257, 401]
SAM_SIDES = [32, 40, 64, 80]


def cu_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed_qkv(total, heads, d, dtype, nan_margin=False, device="cpu"):
    """q, k, v as strided views of one packed qkv projection output [total, 3, heads, d]."""
    qkv = torch.randn(total, 3, heads, d) * 0.5
    if nan_margin:  # any read past the rows, heads or channels of a sequence turns to NaN
        big = torch.full((total + 7, 3, heads + 1, d + 8), float("nan"))
        big[:total, :, :heads, :d] = qkv
        return big.to(device, dtype)[:total, :, :heads, :d].unbind(1)   # views made on the device
    return qkv.to(device, dtype).unbind(1)


def fused(*args, **kwargs):
    backend = fused_backend(args[0].device)
    with dk.backend(backend):
        out = dk.ops.varlen_attention(*args, **kwargs)
    assert dk.last_backends()["varlen_attention"].backend == backend
    return out


def per_sequence(q, k, v, lengths, scale=None, tables=None, grids=None):
    """The oracle, one sequence at a time in fp32 (no packing involved)."""
    outs, start = [], 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        one = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        extra = {}
        if tables is not None:
            extra = dict(rel_pos_h=tables[0].float(), rel_pos_w=tables[1].float(),
                         grid_hw=torch.tensor([grids[i]], dtype=torch.int32, device=q.device))
        outs.append(ref.varlen_attention(q[sl].float(), k[sl].float(), v[sl].float(), one, n, scale, **extra))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,lengths,heads", by_device([
    ([1], 2),                          # a single token
    ([65, 101, 257, 401], 2),          # CLIP over Tiny / Small / Base / Large (+ CLS)
    ([3, 0, 64, 63, 65, 1, 130], 2),   # partial tiles, an empty sequence, tile multiples +- 1
    ([700], 2),                        # one long sequence: many key tiles
], [([n] * B, 16) for n in CLIP_LENGTHS for B in (1, 8)] + [(CLIP_LENGTHS * 2, 16)],
    ids=lambda c: "-".join(map(str, c[0][:8]))))
def test_matches_per_sequence_reference(device, lengths, heads, dtype):
    q, k, v = packed_qkv(sum(lengths), heads, 64, dtype, nan_margin=True, device=device)
    out = fused(q, k, v, cu_of(lengths, device), max(lengths), allow_empty=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, per_sequence(q, k, v, lengths), dtype, msg=f"lengths={lengths}")


EDGE_DEVICES = by_device([()], [()], ids=lambda c: "edge")   # edge cases: the same small shapes on both


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("d", [16, 32, 128])
def test_other_head_dims_and_scale(device, d):
    lengths = [5, 40, 17]
    q, k, v = packed_qkv(sum(lengths), 3, d, torch.float16, device=device)
    out = fused(q, k, v, cu_of(lengths, device), 40, scale=0.3)
    assert_close(out, per_sequence(q, k, v, lengths, scale=0.3), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,grids,heads,table_rows", by_device([
    # scaled-down 32/40/64/80 sides, a non-square one, a 1x1
    ([(4, 4), (5, 5), (8, 8), (10, 10), (3, 7), (1, 1)], 2, 27),
], [([(s, s)] * B, 12, 127) for s in SAM_SIDES for B in (1, 8)] + [([(s, s) for s in SAM_SIDES] * 2, 12, 127)],
    ids=lambda c: f"{len(c[0])}x{c[0][0][0]}" + ("-mixed" if len(set(c[0])) > 1 else "")))
def test_rel_pos_bias_per_sequence_grid(device, grids, heads, table_rows, dtype):
    """Each sequence carries its own grid, and the tables are resized per grid as the reference does."""
    lengths = [h * w for h, w in grids]
    q, k, v = packed_qkv(sum(lengths), heads, 64, dtype, nan_margin=True, device=device)
    tables = [(torch.randn(table_rows, 64) * 0.3).to(device, dtype) for _ in range(2)]
    out = fused(q, k, v, cu_of(lengths, device), max(lengths), rel_pos_h=tables[0], rel_pos_w=tables[1],
                grid_hw=torch.tensor(grids, dtype=torch.int32, device=device))
    assert_close(out, per_sequence(q, k, v, lengths, tables=tables, grids=grids), dtype)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_bias_matches_the_sam_global_kernel_path(device):
    """A packed batch of SAM global grids equals the rel-pos attention op on each grid."""
    grids = [(6, 6), (4, 4)]
    heads, d = 2, 32
    tables = [(torch.randn(11, d) * 0.3).to(device) for _ in range(2)]
    qkvs = [(torch.randn(1, h, w, 3 * heads * d) * 0.5).to(device) for h, w in grids]
    packed = torch.cat([t.reshape(-1, 3, heads, d) for t in qkvs])
    q, k, v = packed.unbind(1)
    out = fused(q, k, v, cu_of([h * w for h, w in grids], device), 36, rel_pos_h=tables[0], rel_pos_w=tables[1],
                grid_hw=torch.tensor(grids, dtype=torch.int32, device=device))
    want = torch.cat([ref.rel_pos_attention(t, tables[0], tables[1], heads, 0).reshape(-1, heads, d) for t in qkvs])
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_lengths_change_without_new_launch_geometry(device):
    """Two batches with the same max_seqlen but other lengths: same code path, right answers."""
    for lengths in ([10, 50, 3], [50, 1, 1, 20]):
        q, k, v = packed_qkv(sum(lengths), 1, 32, torch.float32, device=device)
        assert_close(fused(q, k, v, cu_of(lengths, device), 50), per_sequence(q, k, v, lengths), torch.float32)


def test_empty_sequences_are_an_error_unless_allowed():
    q = torch.randn(0, 2, 32)
    with pytest.raises(ValueError, match=r"cu_seqlens holds an empty sequence \(sequence 0: .*allow_empty=True"):
        dk.ops.varlen_attention(q, q, q, torch.tensor([0, 0, 0], dtype=torch.int32), 0)
    q = torch.randn(5, 2, 32)
    with pytest.raises(ValueError, match=r"sequence 1: cu_seqlens\[1\] == cu_seqlens\[2\] == 5"):
        dk.ops.varlen_attention(q, q, q, torch.tensor([0, 5, 5], dtype=torch.int32), 5)
    out = fused(torch.randn(0, 2, 32), torch.randn(0, 2, 32), torch.randn(0, 2, 32),
                torch.tensor([0, 0, 0], dtype=torch.int32), 0, allow_empty=True)
    assert out.shape == (0, 2, 32)


def test_unsupported_head_dim_is_refused_with_the_reason():
    q = torch.randn(10, 2, 48)
    with pytest.raises(RuntimeError, match=r"triton-interpret: head_dim 48 not in \(16, 32, 64, 128\)"):
        fused(q, q, q, cu_of([4, 6]), 6)
    dk.ops.varlen_attention(q, q, q, cu_of([4, 6]), 6)  # auto: the CPU's blocked SDPA serves it
    assert dk.last_backends()["varlen_attention"].backend == "sdpa-blocked"
