"""Where each sequence lies in a packed token stream (the varlen attention's view of a batch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    cu_seqlens: torch.Tensor            # int32 [num_seqs + 1]
    max_seqlen: int                     # a host int: launches need no device sync
    grid_hw: torch.Tensor | None = None  # int32 [num_seqs, 2] (row-major grids) for rel-pos bias

    @classmethod
    def of_lengths(cls, lengths: list[int], device) -> "Packing":
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls(torch.tensor(offsets, dtype=torch.int32, device=device), max(lengths, default=0))

    @classmethod
    def of_grids(cls, grids: list[tuple[int, int]], device) -> "Packing":
        lengths = cls.of_lengths([h * w for h, w in grids], device)
        return cls(lengths.cu_seqlens, lengths.max_seqlen, torch.tensor(grids, dtype=torch.int32, device=device).view(-1, 2))
