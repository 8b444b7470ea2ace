"""The ``sdpa-blocked`` backend: the attention ops on a CPU with no dense bias or mask.

Upstream (and the reference) add a dense ``[S, heads, N, N]`` bias to the scores: at a Base global
block that is 12 x 4096 x 4096 values, 805 MB in fp32, written fresh for every block (first-touch
page faults cost more than the adds) and read back once by SDPA. Here the bias exists one block of
query rows at a time, in one buffer reused for every block:

    bias[s, h, i, (y', x')] = rel_h[s, h, i, y'] + rel_w[s, h, i, x']     (i in the block's rows)

``rel_h = q . Rh`` and ``rel_w = q . Rw`` (the unscaled q, as upstream) are the small decomposed
terms (``[S, heads, N, h]`` and ``[S, heads, N, w]``), computed once per call with upstream's two
einsums (in the compute dtype, below); each block's bias is their broadcast sum written into the buffer, and torch's
SDPA (its CPU flash kernel) runs that block's query rows against every key with it as the additive
mask. Every row sees the same bias values and the same key/value split as in one dense call, so the
output equals the reference's to rounding (bit for bit in the cases measured).

Windowed blocks run a few window rows at a time, end to end: their padded windows built with one
copy straight into the head-major layout SDPA reads (padded tokens carry ``pad_kv``, unmasked, as
upstream's zero-padded tokens after the qkv Linear), attended, and copied back to their real tokens
of the output: only one chunk's windows exist at once.

Block sizes come from :func:`plan`: whole sequences (windows) per block while their bias fits
``BIAS_BLOCK_ELEMENTS``, else fewer heads, else a run of query rows (a multiple of
``ROW_QUANTUM``, the flash kernel's query split for long queries). Forward only: autograd falls back
to the reference (the backend is registered non-differentiable).

The packed varlen op runs each sequence alone (no padding to the longest), with the same blocked
bias for SAM's packed global grids; DeepEncoder V2's prefix-LM sequences [p image tokens; queries]
as two SDPA calls, the image rows over the image keys with no mask and the query rows over every key
with a ``[n - p, n]`` mask shared by the heads, GQA read in place (``enable_gqa``). Measured at V2's
512-token sequence (p 256, 14 heads on 2, fp32, one thread, CPU ms): this 18.3, the dense-mask SDPA
with repeated K/V (upstream's) 28.8, three mask-free calls merged by their logsumexp 25.0.

Half precision on a CPU without matrix units for it (bf16 without AVX512-BF16 or AMX, fp16 without
AMX-FP16: torch then emulates the matmuls, several times slower than fp32) is computed in fp32
(:func:`compute_dtype`): q, k, v and the decomposed terms are converted in the copies made anyway,
the bias is summed in fp32 (upstream rounds each term and the sum to the activation dtype), and the
output is rounded once. Closer to the exact result than the reference, never further: tests hold it
to FlashAttention's rule (at most twice the reference's own error in that dtype).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import reference

# Elements of one block's bias with one intra-op thread: 4 Mi = 16 MiB in fp32 (vs 805 MB dense at a Base
# global block): 1024 query rows of one head there, 9 windows of 12 heads in a windowed block. Measured at
# Base, fp32, one thread, CPU seconds, medians of 3-5 interleaved runs, two sweeps on a loaded 2-core EPYC:
# global 1.21 / 1.07 / 1.08-1.19 / 1.08 at 2 / 4 / 8 / 16 Mi, windowed 0.116-0.147 at 1-4 Mi and 0.143-0.148
# at 8 Mi (upstream: 1.64-1.70 and 0.227-0.270), flat within the noise; 4 Mi is the smallest at the best times.
BIAS_BLOCK_ELEMENTS = 1 << 22
# With several threads every op of a block is a parallel region whose threads all wait for the slowest:
# on a shared machine a descheduled thread costs milliseconds per region, so fewer, larger blocks win.
# Base, fp32, 2 threads, wall seconds, medians of 4-6 at load ~3 on 2 cores: global 1.98 / 1.49 / 1.30 / 1.22
# at 4 / 8 / 16 / 32 Mi (upstream 1.53), windowed 0.64 / 0.31 / 0.25 / 0.27 (upstream 0.32-0.33).
MULTI_THREAD_BIAS_BLOCK_ELEMENTS = 1 << 24
ROW_QUANTUM = 256


def plan(seqs: int, heads: int, n: int, budget: int | None = None) -> tuple[int, int, int]:
    """(sequences, heads, query rows) per block for ``seqs`` sequences of ``n`` tokens and ``heads``
    heads, so that one block's bias (their product times ``n``) stays within ``budget`` elements
    (default :func:`bias_budget`; at least one row of one head of one sequence)."""
    budget = bias_budget() if budget is None else budget
    per_head = n * n
    if per_head * heads <= budget:
        return max(1, min(seqs, budget // (per_head * heads))), heads, n
    if per_head <= budget:
        return 1, budget // per_head, n
    rows = budget // n
    rows = rows // ROW_QUANTUM * ROW_QUANTUM if rows >= ROW_QUANTUM else max(1, rows)
    return 1, 1, min(n, rows)


def bias_budget() -> int:
    """Bias elements per block: ``BIAS_BLOCK_ELEMENTS`` with one intra-op thread, else
    ``MULTI_THREAD_BIAS_BLOCK_ELEMENTS`` (64 MiB in fp32) grown with the threads past 4 (SDPA parallelises
    a block over its heads x 256-row query splits). While torch.compile traces (the thread count is not
    traceable): the several-thread budget."""
    threads = 2 if torch.compiler.is_compiling() else torch.get_num_threads()
    if threads == 1:
        return BIAS_BLOCK_ELEMENTS
    return MULTI_THREAD_BIAS_BLOCK_ELEMENTS * max(1, threads // 4)


@functools.lru_cache(None)
def _native_matmul(dtype: torch.dtype) -> bool:
    cpu = torch.cpu
    flag = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731  (private probes: absent = no)
    if dtype == torch.bfloat16:
        return flag("_is_avx512_bf16_supported") or flag("_is_amx_tile_supported")
    if dtype == torch.float16:
        return flag("_is_amx_fp16_supported")
    return True


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the attention runs in for activations of ``dtype``: fp32 for bf16/fp16 on a CPU
    that emulates their matmuls, else ``dtype`` itself."""
    return dtype if _native_matmul(dtype) else torch.float32


def rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int,
                  act_dtype: torch.dtype | None = None):
    """``q`` ``[S, heads, h*w, d]`` (unscaled) -> (``rel_h`` ``[S, heads, h*w, h]``, ``rel_w``
    ``[S, heads, h*w, w]``), contiguous, in q's dtype: upstream's einsums with tables resized as it
    does and cast to the activation dtype ``act_dtype`` (default q's; q may be its fp32 copy)."""
    S, nh, N, d = q.shape
    act_dtype = act_dtype or q.dtype
    Rh = reference.rel_pos_lookup(h, rel_pos_h).to(act_dtype).to(q.dtype)
    Rw = reference.rel_pos_lookup(w, rel_pos_w).to(act_dtype).to(q.dtype)
    r_q = q.reshape(S * nh, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).contiguous().view(S, nh, N, h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).contiguous().view(S, nh, N, w)
    return rel_h, rel_w


def attention(q, k, v, rel_h, rel_w, h: int, w: int, out: torch.Tensor, scale: float | None = None,
              prefix: int | None = None, budget: int | None = None, buf: torch.Tensor | None = None) -> None:
    """Blocked ``softmax(scale q k^T + rel_h + rel_w [+ prefix-LM mask]) v`` written into ``out``.

    q: ``[S, heads, N, d]``; k, v: ``[S, kv_heads, N, d]`` (``heads % kv_heads == 0``, query head
    ``i`` reads kv head ``i // (heads // kv_heads)``), unit stride in d. rel_h ``[S, heads, N, h]`` and
    rel_w ``[S, heads, N, w]`` (N = h * w, keys in row-major grid order), or both None for no bias.
    ``prefix``: the prefix-LM mask (rows i < p see keys j < p, rows i >= p keys j < p or j <= i), or
    None for none. ``out``: ``[S, heads, N, d]``, any strides (each block is copied into its view).
    ``budget``: bias elements per block (default :func:`bias_budget`); ``buf``: a 1-D buffer of q's dtype
    for the bias blocks to reuse (from an earlier call), allocated here when None or too small."""
    S, nh, N, _ = q.shape
    gqa = k.shape[1] != nh
    if rel_h is None:
        # no bias to build: image rows (or all rows) attend with no mask, the query rows of a
        # prefix-LM with a [N - p, N] mask shared by the heads (not [N, N] per head)
        if prefix is None or prefix >= N:
            out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa))
        elif prefix == 0:
            out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=gqa))
        else:
            p = prefix
            out[:, :, :p].copy_(F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], scale=scale,
                                                               enable_gqa=gqa))
            mask = _prefix_mask(p, N, p, N, q.dtype, q.device)
            out[:, :, p:].copy_(F.scaled_dot_product_attention(q[:, :, p:], k, v, attn_mask=mask, scale=scale, enable_gqa=gqa))
        return
    if gqa:   # never in DeepEncoder (rel-pos is SAM's, GQA the causal flow's): plain repeated K/V
        k, v = (t.repeat_interleave(nh // t.shape[1], dim=1) for t in (k, v))
    seqs, heads, rows = plan(S, nh, N, budget)
    if buf is None or buf.numel() < seqs * heads * rows * N:
        buf = q.new_empty(seqs * heads * rows * N)
    for s0 in range(0, S, seqs):
        s1 = min(S, s0 + seqs)
        for h0 in range(0, nh, heads):
            h1 = min(nh, h0 + heads)
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                bias = buf[: (s1 - s0) * (h1 - h0) * (r1 - r0) * N].view(s1 - s0, h1 - h0, r1 - r0, h, w)
                torch.add(rel_h[s0:s1, h0:h1, r0:r1, :, None], rel_w[s0:s1, h0:h1, r0:r1, None, :], out=bias)
                bias = bias.view(s1 - s0, h1 - h0, r1 - r0, N)
                if prefix is not None and prefix < N:
                    # the reference adds finfo.min: bias + min rounds to min, as masked_fill writes it
                    bias.masked_fill_(_prefix_mask(prefix, N, r0, r1, torch.bool, q.device).logical_not(), torch.finfo(q.dtype).min)
                o = F.scaled_dot_product_attention(q[s0:s1, h0:h1, r0:r1], k[s0:s1, h0:h1], v[s0:s1, h0:h1],
                                                   attn_mask=bias, scale=scale)
                out[s0:s1, h0:h1, r0:r1].copy_(o)


def _prefix_mask(p: int, n: int, r0: int, r1: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Rows ``r0:r1`` of the prefix-LM mask over ``n`` keys: bool (True = visible), or additive
    (0 visible, ``finfo(dtype).min`` not, as DeepSeek-OCR 2's mask) for a float ``dtype``."""
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    allowed = (j < p) | (j <= i)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A row-major copy of ``t`` in ``dtype``: layout and conversion in one pass."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _real_parts(H: int, W: int, window: int, rows: tuple[int, int]):
    """The real grid within window rows ``rows`` (first, last + 1) as at most four rectangles of whole
    or partial windows: (window rows i0:i1, grid rows per window ny; window columns j0:j1, grid
    columns per window nx). Grid row ``i * window + y`` is row y of window row i, likewise columns."""
    fh, rh = divmod(H, window)
    fw, rw = divmod(W, window)
    for i0, i1, ny in ((0, fh, window), (fh, fh + 1, rh)):
        i0, i1 = max(i0, rows[0]), min(i1, rows[1])
        for j0, j1, nx in ((0, fw, window), (fw, fw + 1, rw)):
            if i1 > i0 and ny and j1 > j0 and nx:
                yield i0, i1, ny, j0, j1, nx


def _window_grid(t: torch.Tensor, B: int, nwh: int, nww: int, window: int) -> torch.Tensor:
    """``t`` ``[..., B * nWh * nWw, heads, window^2, d]`` (windows row-major, head-major inside) seen as
    the padded grid split into windows: ``[B, nWh, window, nWw, window, ..., heads, d]`` (a view)."""
    lead = t.shape[:-4]
    heads, d = t.shape[-3], t.shape[-1]
    t = t.view(*lead, B, nwh, nww, heads, window, window, d)
    n = len(lead)
    return t.permute(n, n + 1, n + 4, n + 2, n + 5, *range(n), n + 3, n + 6)


def _grid_part(x: torch.Tensor, i0, i1, ny, j0, j1, nx, window: int) -> torch.Tensor:
    """The rectangle of :func:`_real_parts` in a [B, H, W, ...] grid, as [B, i1-i0, ny, j1-j0, nx, ...]."""
    part = x[:, i0 * window:i0 * window + (i1 - i0) * ny, j0 * window:j0 * window + (j1 - j0) * nx]
    return part.reshape(x.shape[0], i1 - i0, ny, j1 - j0, nx, *x.shape[3:])


def _windows(qkv: torch.Tensor, window: int, pad_kv: torch.Tensor | None, num_heads: int, dtype: torch.dtype,
             rows: tuple[int, int]) -> torch.Tensor:
    """Window rows ``rows`` of [B, H, W, 3C] -> [3, B * (rows) * nWw, heads, window^2, d] in ``dtype``:
    padded windows (row-major) in the head-major layout SDPA reads, padded tokens = ``pad_kv`` (zeros
    when None). One pass of writes: the real tokens and the padding go straight to their windows."""
    B, H, W, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    nww = reference.padded_size(W, window) // window
    n = rows[1] - rows[0]
    out = qkv.new_empty(3, B * n * nww, num_heads, window * window, d, dtype=dtype)
    grid = _window_grid(out, B, n, nww, window)     # [B, n, ws, nWw, ws, 3, heads, d]
    src = qkv.view(B, H, W, 3, num_heads, d)
    for i0, i1, ny, j0, j1, nx in _real_parts(H, W, window, rows):
        grid[:, i0 - rows[0]:i1 - rows[0], :ny, j0:j1, :nx] = _grid_part(src, i0, i1, ny, j0, j1, nx, window)
    fh, rh = divmod(H, window)
    fw, rw = divmod(W, window)
    if rh and rows[0] <= fh < rows[1] or rw:
        fill = out.new_zeros(()) if pad_kv is None else pad_kv.to(qkv.dtype).to(dtype).view(3, num_heads, d)
        if rh and rows[0] <= fh < rows[1]:
            grid[:, fh - rows[0], rh:] = fill    # the last window row's padded rows
        if rw:
            grid[:, :, :, fw, rw:] = fill        # the last window column's padded columns
    return out


def _unpartition(windows: torch.Tensor, out: torch.Tensor, window: int, rows: tuple[int, int]) -> None:
    """Window rows ``rows`` ([B * (rows) * nWw, heads, window^2, d]) into their real tokens of ``out``
    ([B, H, W, heads, d]), padding dropped."""
    B, H, W = out.shape[:3]
    nww = reference.padded_size(W, window) // window
    grid = _window_grid(windows, B, rows[1] - rows[0], nww, window)   # [B, n, ws, nWw, ws, heads, d]
    for i0, i1, ny, j0, j1, nx in _real_parts(H, W, window, rows):
        _grid_part(out, i0, i1, ny, j0, j1, nx, window).copy_(grid[:, i0 - rows[0]:i1 - rows[0], :ny, j0:j1, :nx])


def rel_pos_attention(qkv, rel_pos_h, rel_pos_w, num_heads: int, window_size: int = 0, pad_kv=None,
                      budget: int | None = None):
    """Same contract and result as :func:`deepencoder_kernels.reference.rel_pos_attention`
    (``budget``: bias elements per block, default :func:`bias_budget`)."""
    B, H, W, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    work = compute_dtype(qkv.dtype)
    if window_size:
        # a few window rows at a time, end to end (windows, attention, back to the grid): only a chunk's
        # windows exist at once, in the compute dtype
        ws = window_size
        nwh, nww = reference.padded_size(H, ws) // ws, reference.padded_size(W, ws) // ws
        per_block = plan(B * nwh * nww, num_heads, ws * ws, budget)[0]
        step = max(1, per_block // (B * nww))
        out = qkv.new_empty(B, H, W, num_heads, d)
        block = plan(B * step * nww, num_heads, ws * ws, budget)      # (windows, heads, rows) of a chunk's blocks
        buf = qkv.new_empty(math.prod(block) * ws * ws, dtype=work)    # every chunk's bias blocks: one buffer
        for i in range(0, nwh, step):
            rows = (i, min(nwh, i + step))
            q, k, v = _windows(qkv, ws, pad_kv, num_heads, work, rows).unbind(0)
            o = torch.empty_like(q)
            rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, ws, ws, qkv.dtype)
            attention(q, k, v, rel_h, rel_w, ws, ws, o, budget=budget, buf=buf)
            _unpartition(o, out, ws, rows)
        return out.view(B, H, W, num_heads * d)
    # one copy to head-major q, k, v (qkv may be strided in all but its last dim)
    q, k, v = _dense(qkv.view(B, H, W, 3, num_heads, d).permute(3, 0, 4, 1, 2, 5), work).view(3, B, num_heads, H * W, d).unbind(0)
    out = q.new_empty(B, H, W, num_heads, d, dtype=qkv.dtype)
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, H, W, qkv.dtype)
    attention(q, k, v, rel_h, rel_w, H, W, out.view(B, H * W, num_heads, d).transpose(1, 2), budget=budget)
    return out.view(B, H, W, num_heads * d)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, rel_pos_h, rel_pos_w, grid_hw, max_side, prefix_lens=None,
                     rope_cos=None, rope_sin=None):
    """Same contract and result as :func:`deepencoder_kernels.reference.varlen_attention`: each
    sequence alone (no padding to the longest), its rel-pos bias built one block of rows at a time,
    its prefix-LM mask only over the query rows, GQA read in place."""
    total, heads, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    num_seqs = cu_seqlens.shape[0] - 1
    plain = rel_pos_h is None and prefix_lens is None and rope_cos is None
    work = compute_dtype(q.dtype)
    if plain and num_seqs and max_seqlen and num_seqs * max_seqlen == total:
        # equal lengths (the only way they can sum to num_seqs * max_seqlen): one batched call, upstream CLIP's own
        qb, kb, vb = (t.view(num_seqs, max_seqlen, t.shape[1], d).transpose(1, 2).to(work) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=k.shape[1] != heads)
        return out.transpose(1, 2).reshape(total, heads, d).to(q.dtype)
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q) if bounds[0] == 0 and bounds[-1] == total else torch.zeros_like(q)
    grids = grid_hw.tolist() if rel_pos_h is not None else None
    prefixes = prefix_lens.tolist() if prefix_lens is not None else None
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = end - start
        if n <= 0:
            continue
        qi, ki, vi = q[start:end], k[start:end], v[start:end]
        if rope_cos is not None:
            qi, ki = (reference.apply_rope(t[None], rope_cos[:n], rope_sin[:n])[0] for t in (qi, ki))
        qi, ki, vi = (_dense(t.transpose(0, 1), work)[None] for t in (qi, ki, vi))   # [1, heads, n, d]
        rel_h = rel_w = None
        h = w = 0
        if rel_pos_h is not None:
            h, w = grids[i]
            rel_h, rel_w = rel_pos_terms(qi, rel_pos_h, rel_pos_w, h, w, q.dtype)
        attention(qi, ki, vi, rel_h, rel_w, h, w, out[start:end].transpose(0, 1)[None], scale,
                  None if prefixes is None else prefixes[i])
    return out
