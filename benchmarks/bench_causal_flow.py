"""DeepEncoder V2's causal-flow attention (one Qwen2 layer's attention, RoPE included): the package's
fused prefix-LM + GQA + RoPE varlen op against the ways it is served today.

Workloads (14 query heads, 2 kv heads, d = 64, bf16; each view is [n image tokens; n queries],
prefix-LM: image rows see the image, query i sees the image and queries up to i):
- a 1024 global view (n = 256, L = 512), a 768 tile (n = 144, L = 288),
- a 6-tile page (6 x 288 + 512 packed); with ``--all`` also 8 such pages.

Implementations (all get q, k unrotated and apply RoPE as part of the timed call, since the fused op
does; every output is compared with the package's):
- "this package": ``ops.varlen_attention(..., prefix_lens, rope_cos, rope_sin)``, one launch for
  every view; also without RoPE (q, k rotated beforehand) to show the attention alone.
- "DeepSeek's code": per image (the global view at batch 1, an image's tiles as one batch) a dense
  ``[B, 1, L, L]`` float mask built by a Python loop over the queries (two index-puts each, indices
  from CPU token-type ids) -- timed apart, as it is built once per forward and shared by the 24
  layers --, K/V repeated 7x, SDPA with that mask.
- "transformers deepseek_ocr2" (where importable): its mask (``create_causal_mask`` with
  ``block_sequence_ids``, timed apart) and its ``apply_rotary_pos_emb`` + ``sdpa_attention_forward``.
- "FlexAttention": one call over the packed stream with a prefix-LM document block mask
  (``create_block_mask`` timed apart; flex_attention compiled once beforehand).
- "two plain SDPA calls" per view size: image rows bidirectional over the image keys, query rows
  bottom-right causal over all keys (``causal_lower_right``), GQA in SDPA (FlashAttention-eligible
  masks), and the same with flash-attn's varlen calls where installed.

CPU machines skip the timing (no figures from the interpreter); ``tests/test_benchmarks_smoke.py``
runs the GPU code path on the CPU at tiny shapes. Results: ``results/causal_flow_<gpu>.json``.

    cd benchmarks && python bench_causal_flow.py [--quick | --all]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from deepencoder_kernels import reference
from common import GpuRun, write_result

N_GLOBAL, N_TILE = 256, 144   # image tokens (= queries) of a 1024 view and of a 768 tile
WORKLOADS = {
    "1024 view (L=512)": [N_GLOBAL],
    "768 tile (L=288)": [N_TILE],
    "6-tile page": [N_TILE] * 6 + [N_GLOBAL],
    "8 pages of 6 tiles": ([N_TILE] * 6 + [N_GLOBAL]) * 8,   # --all only (FlexAttention compiles once more per shape)
}
DEFAULT = ("1024 view (L=512)", "768 tile (L=288)", "6-tile page")
QUICK = ("1024 view (L=512)", "6-tile page")


@dataclass
class Problem:
    """A packed batch of views: q [T, heads, d], k/v [T, kv_heads, d] (unrotated), int32 cu_seqlens
    and prefix_lens on the device, RoPE tables [L, d] in the activation dtype, and per view its n."""

    ns: list[int]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    prefix_lens: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return 2 * max(self.ns)

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def flops(self) -> int:
        """Multiply-adds x 2 of QK^T and PV over the visible pairs only: n^2 image pairs and
        n + i + 1 keys for query i, per view and head."""
        d = self.q.shape[-1]
        pairs = sum(2 * n * n + n * (n + 1) // 2 for n in self.ns)
        return 4 * pairs * d * self.heads

    def views(self, n: int):
        """(q, k, v) [B, heads, L, d] of the views with n image tokens, and their packed row offsets."""
        starts = [int(self.cu_seqlens[i]) for i, m in enumerate(self.ns) if m == n]
        rows = torch.tensor(starts, device=self.q.device)[:, None] + torch.arange(2 * n, device=self.q.device)[None, :]
        return [t[rows].transpose(1, 2) for t in (self.q, self.k, self.v)], rows


def problem(ns, heads=cfg.CAUSAL_FLOW_HEADS, kv_heads=cfg.CAUSAL_FLOW_KV_HEADS, d=cfg.CAUSAL_FLOW_DIM // cfg.CAUSAL_FLOW_HEADS,
            device="cuda", dtype=torch.bfloat16, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    lengths = [2 * n for n in ns]
    total = sum(lengths)
    q = torch.randn(total, heads, d, generator=g).to(device, dtype)
    k, v = (torch.randn(total, kv_heads, d, generator=g).to(device, dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    prefix = torch.tensor(ns, dtype=torch.int32, device=device)
    cos, sin = reference.rope_tables(max(lengths), d, cfg.CAUSAL_FLOW_ROPE_THETA, dtype, device)
    return Problem(list(ns), q, k, v, cu, prefix, cos, sin)


def rotate(x, cos, sin):
    """RoPE in the activation dtype as transformers applies it; x [B, heads, L, d], tables [L, d]."""
    return x * cos + reference.rotate_half(x) * sin


def packed_out(p: Problem, per_size: dict) -> torch.Tensor:
    """Scatter per-size outputs [B, heads, L, d] back into the packed [T, heads, d] layout."""
    out = torch.empty_like(p.q)
    for n, o in per_size.items():
        _, rows = p.views(n)
        out[rows.reshape(-1)] = o.transpose(1, 2).reshape(-1, p.heads, o.shape[-1])
    return out


# ---- the implementations: each returns (setup timed apart or None, attention call) -----------------

def ours(p: Problem, run: GpuRun, rope: bool = True):
    if rope:
        tables = dict(rope_cos=p.cos, rope_sin=p.sin)
        q, k = p.q, p.k
    else:   # the attention alone: q, k rotated beforehand
        tables = {}
        q, k = (_rope_packed(t, p) for t in (p.q, p.k))

    def call():
        with dk.backend(run.fused):
            return dk.ops.varlen_attention(q, k, p.v, p.cu_seqlens, p.max_seqlen, prefix_lens=p.prefix_lens, check_values=False,
                                           **tables)
    return None, call


def _rope_packed(t, p: Problem):
    """RoPE on packed rows at their positions within their sequence (outside the timed call)."""
    rows = torch.arange(t.shape[0], device=t.device)
    seq = torch.searchsorted(p.cu_seqlens[1:].long(), rows, right=True)
    pos = rows - p.cu_seqlens.long()[seq]
    return t * p.cos[pos][:, None] + reference.rotate_half(t) * p.sin[pos][:, None]


def deepseek_mask(n: int, batch: int, dtype, device) -> torch.Tensor:
    """The mask as DeepSeek-OCR 2's decoder-as-encoder builds it per forward: token-type ids on the
    CPU, a full ``[L, L]`` of finfo.min, the image block zeroed, then per query token two
    index-puts (the image columns, the queries up to itself), expanded over the batch."""
    L = 2 * n
    token_type = torch.tensor([0] * n + [1] * n)
    image = (token_type == 0).nonzero().flatten()
    queries = (token_type == 1).nonzero().flatten()
    mask = torch.full((L, L), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[image[:, None].to(device), image[None, :].to(device)] = 0
    for j, i in enumerate(queries.tolist()):
        mask[i, image.to(device)] = 0
        mask[i, queries[: j + 1].to(device)] = 0
    return mask[None, None].expand(batch, 1, L, L)


def deepseek(p: Problem, run: GpuRun):
    """Per image: the global view alone (batch 1), the tiles of each page as one batch."""
    sizes = sorted(set(p.ns))
    pages = max(1, p.ns.count(N_GLOBAL))
    # (n, batch) per call: each page's tiles as one batch, each 1024 view alone
    groups = [(N_TILE, p.ns.count(N_TILE) // pages)] * pages if N_TILE in sizes else []
    groups += [(N_GLOBAL, 1)] * p.ns.count(N_GLOBAL)
    groups += [(n, 1) for n in p.ns if n not in (N_TILE, N_GLOBAL)]   # other sizes (the smoke test's): one at a time
    masks = {}

    def build():
        for n, b in set(groups):
            masks[n, b] = deepseek_mask(n, b, p.q.dtype, p.q.device)
        return masks

    views = {n: p.views(n)[0] for n in sizes}

    def call():
        out, used = {}, {n: 0 for n in sizes}
        for n, b in groups:
            q, k, v = (t[used[n]:used[n] + b] for t in views[n])
            used[n] += b
            L = 2 * n
            q, k = rotate(q, p.cos[:L], p.sin[:L]), rotate(k, p.cos[:L], p.sin[:L])
            k, v = (t.repeat_interleave(p.group, dim=1) for t in (k, v))
            out.setdefault(n, []).append(F.scaled_dot_product_attention(q, k, v, attn_mask=masks[n, b], scale=q.shape[-1] ** -0.5))
        return packed_out(p, {n: torch.cat(o) for n, o in out.items()})
    return build, call


def transformers_native(p: Problem, run: GpuRun):
    """transformers' deepseek_ocr2 vision encoder's attention: its mask and its SDPA path."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import create_causal_mask
        from transformers.models.deepseek_ocr2 import modeling_deepseek_ocr2 as m
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2VisionEncoderConfig
    except ImportError as e:
        return f"transformers' deepseek_ocr2 not importable: {e}"
    d = p.q.shape[-1]
    config = DeepseekOcr2VisionEncoderConfig(hidden_size=p.heads * d, num_attention_heads=p.heads,
                                             num_key_value_heads=p.k.shape[1], num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    module = m.DeepseekOcr2VisionAttention(config, 0).to(p.q.device)   # read for num_key_value_groups / is_causal only
    sizes = sorted(set(p.ns))
    views = {n: p.views(n)[0] for n in sizes}
    masks = {}

    def build():
        for n in sizes:   # one batch per view size (the model takes views of one size per call)
            q = views[n][0]
            embeds = torch.empty(q.shape[0], 2 * n, p.heads * d, device=q.device, dtype=q.dtype)
            blocks = torch.full((q.shape[0], 2 * n), -1, dtype=torch.long, device=q.device)
            blocks[:, :n] = 0
            masks[n] = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                          block_sequence_ids=blocks)
        return masks

    def call():
        out = {}
        for n in sizes:
            q, k, v = views[n]
            L = 2 * n
            q, k = m.apply_rotary_pos_emb(q, k, p.cos[None, :L], p.sin[None, :L])
            o, _ = sdpa_attention_forward(module, q, k, v, masks[n], scaling=d ** -0.5, dropout=0.0)
            out[n] = o.transpose(1, 2)   # sdpa_attention_forward returns [B, L, heads, d]
        return packed_out(p, out)
    return build, call


def flex(p: Problem, run: GpuRun):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"FlexAttention not available: {e}"
    T = p.q.shape[0]
    rows = torch.arange(T, device=p.q.device)
    doc = torch.searchsorted(p.cu_seqlens[1:].long(), rows, right=True)
    pos = rows - p.cu_seqlens.long()[doc]
    prefix = p.prefix_lens.long()

    def prefix_lm(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & ((pos[kv_idx] < prefix[doc[q_idx]]) | (kv_idx <= q_idx))

    attend = flex_attention if run.device != "cuda" else torch.compile(flex_attention, dynamic=False)
    state = {}

    def build():
        state["mask"] = create_block_mask(prefix_lm, None, None, T, T, device=p.q.device)
        return state["mask"]

    def call():
        q, k = (_rope_packed(t, p).transpose(0, 1)[None] for t in (p.q, p.k))
        o = attend(q, k, p.v.transpose(0, 1)[None], block_mask=state["mask"], enable_gqa=True)
        return o[0].transpose(0, 1)
    return build, call


def two_sdpa(p: Problem, run: GpuRun):
    """Per view size: image rows over the image keys (no mask), query rows over all keys with a
    bottom-right causal bias (query i of n sees key j <= n + i): two mask-free SDPA calls."""
    from torch.nn.attention.bias import causal_lower_right

    sizes = sorted(set(p.ns))
    views = {n: p.views(n)[0] for n in sizes}

    def call():
        out = {}
        for n in sizes:
            q, k, v = views[n]
            L = 2 * n
            q, k = rotate(q, p.cos[:L], p.sin[:L]), rotate(k, p.cos[:L], p.sin[:L])
            image = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], enable_gqa=True)
            rest = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=causal_lower_right(n, L), enable_gqa=True)
            out[n] = torch.cat([image, rest], dim=2)
        return packed_out(p, out)
    return None, call


def two_flash_varlen(p: Problem, run: GpuRun):
    """The same two calls with flash-attn's varlen API (causal aligned bottom-right since 2.1), packed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return "flash-attn not installed"
    ns = p.ns
    starts = p.cu_seqlens[:-1].long()
    image_rows = torch.cat([s + torch.arange(n, device=p.q.device) for s, n in zip(starts.tolist(), ns)])
    query_rows = torch.cat([s + n + torch.arange(n, device=p.q.device) for s, n in zip(starts.tolist(), ns)])
    cu_n = torch.tensor([0, *torch.tensor(ns).cumsum(0).tolist()], dtype=torch.int32, device=p.q.device)
    n_max = max(ns)

    def call():
        q, k = (_rope_packed(t, p) for t in (p.q, p.k))
        out = torch.empty_like(p.q)
        out[image_rows] = flash_attn_varlen_func(q[image_rows], k[image_rows], p.v[image_rows], cu_n, cu_n, n_max, n_max)
        out[query_rows] = flash_attn_varlen_func(q[query_rows], k, p.v, cu_n, p.cu_seqlens, n_max, 2 * n_max, causal=True)
        return out
    return None, call


IMPLS = {
    "this package (fused RoPE)": ours,
    "this package, attention only (RoPE outside)": lambda p, run: ours(p, run, rope=False),
    "DeepSeek's code (loop mask + SDPA, K/V repeated)": deepseek,
    "transformers deepseek_ocr2 (SDPA + block mask)": transformers_native,
    "FlexAttention (prefix-LM block mask)": flex,
    "two plain SDPA calls (bidirectional + bottom-right causal)": two_sdpa,
    "two flash-attn varlen calls": two_flash_varlen,
}


def peak_mib(fn, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def workload_rows(name: str, p: Problem, run: GpuRun = GpuRun(), impls=IMPLS) -> list[dict]:
    """Time every implementation on one workload; each output is compared with the package's."""
    rows, want = [], None
    flops = p.flops()
    for impl, make in impls.items():
        made = make(p, run)
        if isinstance(made, str):
            print(f"  {impl:<58} skipped: {made}")
            rows.append(dict(workload=name, impl=impl, skipped=made))
            continue
        build, call = made
        row = dict(workload=name, impl=impl, views=len(p.ns), tokens=int(p.q.shape[0]))
        try:
            if build is not None:
                row["setup_ms"] = run.timer(build)   # the mask / block mask, built once per forward
            with torch.inference_mode():
                out = call()
                if want is None:
                    want = out.float()
                row["max_abs_diff_vs_package"] = float((out.float() - want).abs().max())
                row["ms"] = run.timer(call)
                row["peak_mib"] = peak_mib(call, p.q.device)
        except Exception as e:   # another version of a library (the GPU machine's): a finding, not the end of the run
            if want is None:
                raise   # the package's own row is the reference of every other one
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {impl:<58} FAILED: {row['error']}")
            rows.append(row)
            continue
        row["useful_tflops"] = flops / row["ms"] / 1e9 if row["ms"] else None
        setup = f" + setup {row['setup_ms']:.3f} ms" if "setup_ms" in row else ""
        print(f"  {impl:<58}{row['ms']:9.3f} ms{setup}  diff {row['max_abs_diff_vs_package']:.2e}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--all", action="store_true", help="also 8 pages packed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_causal_flow skipped: torch has no usable CUDA device (the GPU code path is smoke-run by "
              "tests/test_benchmarks_smoke.py; no figures come from the CPU)")
        return 0
    rows = []
    chosen = WORKLOADS if args.all else QUICK if args.quick else DEFAULT
    for name, ns in WORKLOADS.items():
        if name not in chosen:
            continue
        print(f"{name}: {len(ns)} views, {2 * sum(ns)} tokens")
        rows += workload_rows(name, problem(ns))
    print("wrote", write_result(f"causal_flow_{torch.cuda.get_device_name().replace(' ', '_')}", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
