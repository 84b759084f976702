"""The collectives the cache needs, over one torch.distributed group (in vLLM: the tensor-parallel group's
CPU side). Every rank calls them in the same order; what a rank computes between them is wrapped so that a
failure becomes a value it shares, never a rank that skips a collective (which would hang the others)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    size: int
    group: Any = None  # a ProcessGroup; None: the default group

    @classmethod
    def of(cls, group: Any = None) -> Ranks:
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def all_gather(self, value: object) -> list:
        if self.size == 1:
            return [value]
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def first(self, value: object) -> object:
        """Rank 0's `value`, on every rank."""
        return self.all_gather(value)[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)
