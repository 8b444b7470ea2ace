"""Where each sequence lies in a packed token stream (the varlen attention's view of a batch)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

# Packings by (grids or lengths, device): the encoder builds one per batch from host ints, and a
# batch seen before (a warm-up before CUDA-graph capture, a serving batch shape) reuses its device
# tensors instead of uploading host data again (an upload cannot happen inside a captured graph).
_CACHE: OrderedDict = OrderedDict()
CACHE_SIZE = 64


def _cached(key, make):
    if torch.compiler.is_compiling():   # dynamo traces the construction (constants in its graph)
        return make()
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    device = torch.device(key[-1])
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"no packing for {key[0]} on {device} was made before this CUDA graph capture: run the batch "
                           "once eagerly (a warm-up) or build its Packing before capturing")
    value = make()
    if isinstance(value.cu_seqlens, FakeTensor) or value.cu_seqlens.is_meta:
        return value   # made in a counting pass (fake or meta tensors): holds no values for a real run
    _CACHE[key] = value
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


@dataclass(frozen=True)
class Packing:
    """Device metadata of a packed batch plus the host ints that bound it, so kernels launch with no
    device read. Instances made by :meth:`of_lengths` / :meth:`of_grids` are shared per batch shape:
    treat their tensors as read-only."""

    cu_seqlens: torch.Tensor            # int32 [num_seqs + 1]
    max_seqlen: int                     # a host int: launches need no device sync
    grid_hw: torch.Tensor | None = None  # int32 [num_seqs, 2] (row-major grids) for rel-pos bias
    max_side: int = 0                   # a host int bounding grid_hw (sizes the rel-pos tables)
    prefix_lens: torch.Tensor | None = None   # int32 [num_seqs]: the prefix-LM boundary of each sequence

    @classmethod
    def of_lengths(cls, lengths: list[int], device) -> "Packing":
        lengths = tuple(int(n) for n in lengths)
        return _cached(("lengths", lengths, str(torch.device(device))), lambda: cls._of_lengths(lengths, device))

    @classmethod
    def _of_lengths(cls, lengths, device) -> "Packing":
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls(torch.tensor(offsets, dtype=torch.int32, device=device), max(lengths, default=0))

    @classmethod
    def of_grids(cls, grids: list[tuple[int, int]], device) -> "Packing":
        grids = tuple((int(h), int(w)) for h, w in grids)

        def make():
            lengths = cls._of_lengths([h * w for h, w in grids], device)
            grid_hw = torch.tensor(grids, dtype=torch.int32, device=device).view(-1, 2)
            return cls(lengths.cu_seqlens, lengths.max_seqlen, grid_hw, max([0] + [max(h, w) for h, w in grids]))

        return _cached(("grids", grids, str(torch.device(device))), make)

    @classmethod
    def of_prefix_lm(cls, prefixes: list[int], device) -> "Packing":
        """Sequences of ``[p image tokens; p queries]`` (DeepEncoder V2's causal flow): lengths 2p,
        ``prefix_lens`` p (image tokens see each other, queries see the image and earlier queries)."""
        prefixes = tuple(int(p) for p in prefixes)

        def make():
            lengths = cls._of_lengths([2 * p for p in prefixes], device)
            prefix = torch.tensor(prefixes, dtype=torch.int32, device=device)
            return cls(lengths.cu_seqlens, lengths.max_seqlen, prefix_lens=prefix)

        return _cached(("prefix_lm", prefixes, str(torch.device(device))), make)
