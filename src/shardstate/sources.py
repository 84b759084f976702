"""Whole checkpoint tensors for the converter, one parameter's worth at a time: read from a HF
checkpoint, or reassembled from every rank's slices of a sharded state (resharding)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from shardstate.config import ModelConfig
from shardstate.format.sharded_state import index_rank, open_sharded_state, warn_legacy
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import open_checked
from shardstate.models import build_on_meta
from shardstate.runtime.distributed import TPGroup
from shardstate.spec import ShardSpec


class TensorSource(Protocol):
    files: list[Path]  # what is converted from, for the manifest

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        """The whole source tensors that parameter `name` (described by `spec`) is cut from."""
        ...


class CheckpointSource:
    def __init__(self, root: Path, specs: dict[str, ShardSpec], account: ReadAccount):
        self.checkpoint = open_checked(specs, root, account)
        self.files = [h.path for h in self.checkpoint.headers]
        self.account = account

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        result = {}
        for part in spec.parts:
            location = self.checkpoint.tensors[part.source]
            entry = location.entry
            result[part.source] = self.account.read_tensor(location.file, entry.begin, entry.dtype, entry.shape)
        return result


class ShardedSource:
    """Each parameter is read from every rank's files of the sharded state and merged with the specs of
    the TP size it was saved at."""

    def __init__(self, root: Path, config: ModelConfig, account: ReadAccount):
        state = open_sharded_state(root, allow_legacy=True)
        if state.manifest is None:
            warn_legacy(state)
        self.dtype = state.dtype
        self.tp_size = state.tp_size
        self.specs = build_on_meta(config, TPGroup(0, self.tp_size), self.dtype).shard_specs()
        needs = {name: (spec.local_shape(), self.dtype) for name, spec in self.specs.items()}
        self.locations = [index_rank(state, rank, needs, account) for rank in range(self.tp_size)]
        self.files = [path for rank in range(self.tp_size) for path in state.rank_paths(rank)]
        self.account = account

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        saved = self.specs[name]
        whole = {p.source: torch.empty(p.shape, dtype=self.dtype) for p in saved.parts}
        for rank, locations in enumerate(self.locations):
            entry = locations[name].entry
            local = self.account.read_tensor(locations[name].file, entry.begin, entry.dtype, entry.shape)
            saved.put(rank, local, whole)
        return whole
