"""What model code needs from the data-parallel process group, handed to a module's constructor
(as in vector-quantize-pytorch): never imported, never assigned after construction.

The quantizers (code counts, the EMA codebook's statistics, k-means, dead-code restarts, LFQ's
codebook entropy) and the discriminator's ActNorm (its data-dependent init) take one `Collectives`;
the task builds it from the engine before it builds the models, and `ONE_PROCESS` (the default)
is the identity of a single process. Model code calls the collectives only in training mode, where
every rank runs the same forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Collective = Callable[[torch.Tensor], Optional[torch.Tensor]]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Collectives:
    """`reduce` sums a tensor across data-parallel ranks, `broadcast` copies rank 0's tensor to
    every rank; each works in place or returns the result (a None return means in place). `rank`
    / `world_size` say where this rank's rows sit in the global batch: rank r holds rows
    r*N .. r*N+N-1 (the loop gives every rank the same micro-batch size)."""

    reduce: Collective = _identity
    broadcast: Collective = _identity
    rank: int = 0
    world_size: int = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks."""
        out = self.reduce(t)
        return t if out is None else out

    def from_rank0(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t`, on every rank."""
        out = self.broadcast(t)
        return t if out is None else out


ONE_PROCESS = Collectives()

__all__ = ["Collective", "Collectives", "ONE_PROCESS"]
