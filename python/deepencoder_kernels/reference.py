"""The oracle: plain PyTorch that reproduces upstream DeepEncoder's behaviour, quirks included.

Every backend of every op is tested against the functions here; the reference modules, the
benchmarks and the profiler call them too. Nothing here is fast on purpose: it materialises what
upstream materialises (padded windows, the dense rel-pos bias), so the profiler measures upstream's
real memory.

Upstream quirks kept on purpose:
- windowed blocks zero-pad the normed grid *before* the qkv Linear, so padded keys/values equal the
  qkv bias and are not masked (``pad_kv`` below carries that bias);
- the rel-pos bias uses the *unscaled* q, is built in the activation dtype and is added after the
  ``1/sqrt(d)`` scaling;
- rel-pos tables and absolute position embeddings are resized in fp32, then cast back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
# windows
# ------------------------------------------------------------------------------------------


def padded_size(size: int, window: int) -> int:
    return (size + window - 1) // window * window


def window_partition(x: torch.Tensor, window: int, pad_value: torch.Tensor | None = None):
    """[B, H, W, C] -> ([B * nW, window, window, C], (Hp, Wp)); pads bottom/right.

    ``pad_value`` ([C]) fills the padding (zeros when None), windows are in row-major order.
    """
    B, H, W, C = x.shape
    Hp, Wp = padded_size(H, window), padded_size(W, window)
    if (Hp, Wp) != (H, W):
        fill = x.new_zeros(()) if pad_value is None else pad_value.to(x.dtype)
        padded = fill.expand(B, Hp, Wp, C).clone()
        padded[:, :H, :W] = x
        x = padded
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, padded_hw, hw) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding."""
    Hp, Wp = padded_hw
    H, W = hw
    C = windows.shape[-1]
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.view(B, Hp // window, Wp // window, window, window, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return x[:, :H, :W].contiguous()


# ------------------------------------------------------------------------------------------
# decomposed relative position
# ------------------------------------------------------------------------------------------


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of a [L, d] table to [length, d], in fp32, cast back (upstream rule)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(
        rel_pos.float().t().unsqueeze(0), size=length, mode="linear"
    )  # [1, d, length]
    return resized[0].t().to(rel_pos.dtype)


def rel_pos_lookup(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """R[y, y'] = table[y - y' + size - 1] -> [size, size, d] (queries and keys share the grid)."""
    table = resize_rel_pos(rel_pos, 2 * size - 1)
    coords = torch.arange(size, device=rel_pos.device)
    index = coords[:, None] - coords[None, :] + (size - 1)
    return table[index]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int):
    """Dense decomposed bias [S, heads, h*w, h*w] from the *unscaled* q [S, heads, h*w, d].

    bias[(y,x),(y',x')] = q[y,x] . Rh[y,y'] + q[y,x] . Rw[x,x'], built in q's dtype as upstream does.
    """
    S, nh, N, d = q.shape
    Rh = rel_pos_lookup(h, rel_pos_h).to(q.dtype)
    Rw = rel_pos_lookup(w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(S * nh, h, w, d)
    # contiguous einsum outputs (upstream's reshape makes them so): the broadcast sum then comes out
    # contiguous and the final reshape is a view, not a second copy of the N x N bias
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).contiguous()  # [S*nh, h, w, h]
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).contiguous()  # [S*nh, h, w, w]
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(S, nh, N, N)


# ------------------------------------------------------------------------------------------
# op 1: SAM rel-pos attention (windowed and global)
# ------------------------------------------------------------------------------------------


def rel_pos_attention(qkv, rel_pos_h, rel_pos_w, num_heads: int, window_size: int = 0, pad_kv=None):
    """Upstream SAM attention core (between the qkv and proj Linears).

    qkv: [B, H, W, 3C] (the qkv Linear's output on the real grid, [q | k | v], heads contiguous).
    window_size 0: global attention over the H x W grid; > 0: zero-padded windows whose padded
    tokens carry ``pad_kv`` ([3C], the qkv bias) as q/k/v, unmasked. Returns [B, H, W, C].
    """
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    if window_size > 0:
        seqs, padded_hw = window_partition(qkv, window_size, pad_kv)
        h = w = window_size
    else:
        seqs, h, w = qkv, H, W
    S = seqs.shape[0]
    # q, k, v contiguous as upstream's reshape leaves them (SDPA runs faster on them; same values)
    q, k, v = seqs.reshape(S, h * w, 3, num_heads, d).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    bias = rel_pos_bias(q, rel_pos_h, rel_pos_w, h, w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(d), bias after
    out = out.permute(0, 2, 1, 3).reshape(S, h, w, C)
    if window_size > 0:
        out = window_unpartition(out, window_size, padded_hw, (H, W))
    return out


# ------------------------------------------------------------------------------------------
# op 2: neck + compressor
# ------------------------------------------------------------------------------------------


def layer_norm_2d(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over channels of NCHW, biased variance (upstream LayerNorm2d)."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


def compress(x, neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b, net2_w, net3_w, eps: float = 1e-6):
    """SAM's neck + net_2 + net_3 on the trunk's channels-last output.

    x: [B, H, W, 768] -> tokens [B, (H/4) * (W/4), 1024] (row-major), as CLIP and the concat take.
    """
    y = x.permute(0, 3, 1, 2)  # upstream permutes to NCHW for the convs
    y = F.conv2d(y, neck0_w)
    y = layer_norm_2d(y, neck1_w, neck1_b, eps)
    y = F.conv2d(y, neck2_w, padding=1)
    y = layer_norm_2d(y, neck3_w, neck3_b, eps)
    y = F.conv2d(y, net2_w, stride=2, padding=1)
    y = F.conv2d(y, net3_w, stride=2, padding=1)
    return y.flatten(2).transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------------------
# op 3: packed variable-length attention
# ------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [-x2, x1] with x = [x1, x2] halves (the rotate-half RoPE convention of Qwen2 / Llama)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in x's dtype (cos/sin cast to it first, as transformers'
    rotary embedding returns them); x [..., L, heads, d], cos/sin [L, d]."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


def rope_tables(length: int, dim: int, theta: float, dtype: torch.dtype, device=None):
    """(cos, sin) ``[length, dim]`` for positions 0..length-1: transformers' default RoPE
    (``inv_freq = 1 / theta^(2i / dim)`` in fp32, ``emb = cat(freqs, freqs)``, cos/sin in fp32, then
    cast to the activation dtype), as Qwen2's rotary embedding makes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    freqs = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def prefix_lm_allowed(length_q: int, length_k: int, prefix: torch.Tensor, lengths: torch.Tensor | None = None):
    """Boolean ``[S, 1, Lq, Lk]``: key j is visible to row i iff ``j < p`` or ``j <= i`` (``prefix``
    int ``[S]``; p = 0 is causal, p = length bidirectional), and ``j < length`` when ``lengths`` is given."""
    i = torch.arange(length_q, device=prefix.device)[:, None]
    j = torch.arange(length_k, device=prefix.device)[None, :]
    allowed = (j < prefix.long()[:, None, None]) | (j <= i)
    if lengths is not None:
        allowed = allowed & (j < lengths.long()[:, None, None])
    return allowed[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, ``finfo(dtype).min`` elsewhere, in the activation dtype (DeepSeek-OCR 2's mask)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _sdpa(q, k, v, scale, mask=None):
    """q [S, L, heads, d], k/v [S, L, kv_heads, d] -> [S, L, heads, d]: SDPA with K/V repeated per
    query group (transformers' ``repeat_kv``: query head h reads kv head h // (heads // kv_heads))."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


# padded work per chunk of sequences: at most this many score elements (a bound from shapes, not data)
VARLEN_CHUNK_SCORES = 1 << 26


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None, rel_pos_h=None, rel_pos_w=None, grid_hw=None,
                     prefix_lens=None, rope_cos=None, rope_sin=None):
    """Per-sequence softmax attention over packed tokens.

    q: [total, heads, d]; k, v: [total, kv_heads, d] (GQA when kv_heads < heads: query head h reads
    kv head h // (heads // kv_heads), transformers' ``repeat_kv``); cu_seqlens: int32 [num_seqs + 1].
    - ``rope_cos``/``rope_sin`` ([>= max_seqlen, d]): RoPE on q and k (rotate-half, position = index
      within the sequence, in q's dtype as transformers applies it).
    - ``prefix_lens`` (int [num_seqs]): the prefix-LM mask, as DeepSeek-OCR 2's decoder-as-encoder
      builds it (``qwen2_d2e.py``): rows i < p see keys j < p, rows i >= p keys j <= i; an additive
      ``finfo(dtype).min`` mask in the activation dtype. None: no mask (bidirectional, CLIP).
    - ``rel_pos_h/w`` + ``grid_hw`` ([num_seqs, 2]: h, w with h * w = length): SAM's decomposed bias
      per sequence for its own grid (tables resized per grid as upstream does).
    Without a bias this runs with no host read (sequences gathered into padded chunks by index math,
    ``max_seqlen`` given), so it traces under ``torch.compile(fullgraph=True)``; the rel-pos path
    reads ``cu_seqlens``/``grid_hw`` to the host (one sequence at a time, upstream's per-image loop).
    Returns [total, heads, d].
    """
    total, heads, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    num_seqs = cu_seqlens.shape[0] - 1
    if rel_pos_h is not None:
        return _varlen_rel_pos(q, k, v, cu_seqlens, scale, rel_pos_h, rel_pos_w, grid_hw, prefix_lens, rope_cos, rope_sin)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if num_seqs else 0
    L = max_seqlen
    if total == 0 or num_seqs == 0 or L == 0:
        return torch.zeros_like(q)
    if num_seqs * L == total:
        # Every length is <= L and they sum to num_seqs * L: all equal, so the packed rows are the
        # padded layout as they are (upstream's own batched call, no key padding to mask).
        gather, lengths = None, None
        qp, kp, vp = (t.view(num_seqs, L, t.shape[1], d) for t in (q, k, v))
    else:
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        gather = (starts[:, None] + torch.arange(L, device=q.device)[None, :]).clamp(max=total - 1)   # [S, L]
        qp, kp, vp = (t[gather] for t in (q, k, v))
    if rope_cos is not None:
        qp, kp = apply_rope(qp, rope_cos[:L], rope_sin[:L]), apply_rope(kp, rope_cos[:L], rope_sin[:L])
    chunk = max(1, VARLEN_CHUNK_SCORES // (heads * L * L))
    outs = []
    for s0 in range(0, num_seqs, chunk):
        part = slice(s0, min(num_seqs, s0 + chunk))
        mask = None
        if prefix_lens is not None:
            mask = additive_mask(prefix_lm_allowed(L, L, prefix_lens[part], None if lengths is None else lengths[part]), q.dtype)
        elif lengths is not None:
            keys = torch.arange(L, device=q.device)[None, :] < lengths[part, None]
            mask = additive_mask(keys[:, None, None, :], q.dtype)
        outs.append(_sdpa(qp[part], kp[part], vp[part], scale, mask))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]    # [S, L, heads, d]
    if gather is None:
        return out.reshape(total, heads, d)
    rows = torch.arange(total, device=q.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)   # each packed row's sequence (empty ones skipped)
    return out[seq, rows - cu_seqlens.long()[seq]]


def _varlen_rel_pos(q, k, v, cu_seqlens, scale, rel_pos_h, rel_pos_w, grid_hw, prefix_lens, rope_cos, rope_sin):
    """The rel-pos path of :func:`varlen_attention`: one sequence at a time with its dense bias."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    grids = grid_hw.tolist()
    prefixes = prefix_lens.tolist() if prefix_lens is not None else None
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = end - start
        if n == 0:
            continue
        qi, ki, vi = (t[start:end][None] for t in (q, k, v))   # [1, n, heads, d]
        if rope_cos is not None:
            qi, ki = apply_rope(qi, rope_cos[:n], rope_sin[:n]), apply_rope(ki, rope_cos[:n], rope_sin[:n])
        h, w = grids[i]
        mask = rel_pos_bias(qi.transpose(1, 2), rel_pos_h, rel_pos_w, h, w)   # [1, heads, n, n], unscaled q
        if prefixes is not None:
            allowed = prefix_lm_allowed(n, n, torch.tensor([prefixes[i]], device=q.device))
            mask = mask + additive_mask(allowed, q.dtype)
        out[start:end] = _sdpa(qi, ki, vi, scale, mask)[0]
    return out


# ------------------------------------------------------------------------------------------
# op 4: top-k saccade gather
# ------------------------------------------------------------------------------------------


def saccade_select(scores: torch.Tensor, k: int, spatial_order: bool) -> torch.Tensor:
    """Indices of the k best scores of one image.

    Order: score descending, ties by lower index; NaN ranks below every number (so it is picked
    last, and only when k exceeds the count of non-NaN scores). ``spatial_order`` re-sorts the
    chosen indices ascending (reading order).
    """
    n = scores.shape[0]
    key = scores.float().nan_to_num(nan=-math.inf)
    nan_rank = scores.isnan().to(torch.int64)  # 0 for numbers, 1 for NaN
    index = torch.arange(n, device=scores.device)
    # lexicographic sort: (is_nan asc, score desc, index asc), via stable sorts from the last key
    order = index
    order = order[torch.sort(-key[order], stable=True).indices]
    order = order[torch.sort(nan_rank[order], stable=True).indices]
    chosen = order[:k]
    if spatial_order:
        chosen = torch.sort(chosen).values
    return chosen


def saccade_gather(scores, features, k, cu_seqlens=None, spatial_order: bool = False):
    """Per-image top-k of ``scores`` and the gather of the chosen rows of ``features``.

    scores: [B, N] (or packed [total] with ``cu_seqlens``); features: [B, N, C] (or packed
    [total, C]); k: int64 [B]. Returns (gathered [sum k, C], positions int64 [sum k] indexes within
    each image, cu_seqlens_out int32 [B + 1]).
    """
    if cu_seqlens is None:
        B, N = scores.shape
        starts = [b * N for b in range(B + 1)]
        scores = scores.reshape(-1)
        features = features.reshape(B * N, features.shape[-1])
    else:
        starts = cu_seqlens.tolist()
    ks = k.tolist()
    positions, rows = [], []
    for b, kb in enumerate(ks):
        chosen = saccade_select(scores[starts[b] : starts[b + 1]], kb, spatial_order)
        positions.append(chosen)
        rows.append(features[starts[b] + chosen])
    out_cu = torch.zeros(len(ks) + 1, dtype=torch.int32, device=scores.device)
    out_cu[1:] = torch.tensor(ks, device=scores.device, dtype=torch.int64).cumsum(0)
    if not ks:  # no images
        return features.new_empty(0, features.shape[-1]), torch.empty(0, dtype=torch.int64, device=scores.device), out_cu
    return torch.cat(rows, 0), torch.cat(positions, 0), out_cu
