"""Whole checkpoint tensors for the converter, one parameter's worth at a time: read from a HF
checkpoint, or reassembled from every rank's slices of a sharded state (resharding). Reads go through
the load I/O engine into one scratch allocation reused for every parameter (faulted in once)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from shardstate.config import ModelConfig
from shardstate.format.checkpoint import TensorLocation
from shardstate.format.sharded_state import ShardedState, check_specs, index_rank, warn_legacy
from shardstate.io.engine import Scratch, Span, read_spans
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import open_checked
from shardstate.models import build_on_meta
from shardstate.parallel.distributed import TPGroup
from shardstate.spec import ShardSpec


class TensorSource(Protocol):
    files: list[Path]  # what is converted from, for the manifest

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        """The whole source tensors that parameter `name` (described by `spec`) is cut from; valid until
        the next call (they may share memory the next call reads into)."""
        ...


class CheckpointSource:
    def __init__(self, root: Path, specs: dict[str, ShardSpec], account: ReadAccount):
        self.checkpoint = open_checked(specs, root, account)
        self.files = [h.path for h in self.checkpoint.headers]
        self.account = account
        self.scratch = Scratch()

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        locations = {source: self.checkpoint.tensors[source] for source in spec.sources()}
        tensors = read_entries(list(locations.values()), self.account, self.scratch)
        return dict(zip(locations, tensors, strict=True))


class ShardedSource:
    """Each parameter is read from every rank's files of the sharded state and merged with the specs of
    the TP size it was saved at."""

    def __init__(self, state: ShardedState, config: ModelConfig, account: ReadAccount):
        if state.manifest is None:
            warn_legacy(state)
        self.dtype = state.dtype
        self.tp_size = state.tp_size
        self.specs = build_on_meta(config, TPGroup(0, self.tp_size), self.dtype).shard_specs()
        if state.manifest is not None:
            check_specs(state.manifest, self.specs, state.manifest_path)
        needs = {name: (spec.local_shape(), self.dtype) for name, spec in self.specs.items()}
        self.locations = [index_rank(state, rank, needs, account) for rank in range(self.tp_size)]
        self.files = [path for rank in range(self.tp_size) for path in state.rank_paths(rank)]
        self.account = account
        self.scratch = Scratch()

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        saved = self.specs[name]
        whole = {source: torch.empty(shape, dtype=self.dtype) for source, shape in saved.sources().items()}
        local = read_entries([locations[name] for locations in self.locations], self.account, self.scratch)
        for rank, tensor in enumerate(local):
            saved.put(rank, tensor, whole)
        return whole


def read_entries(locations: list[TensorLocation], account: ReadAccount, scratch: Scratch) -> list[torch.Tensor]:
    """The tensors at `locations`, read together into `scratch` (valid until its next use)."""
    spans = [Span(loc.file, loc.entry.begin, loc.entry.end) for loc in locations]
    raw = read_spans(spans, "read", account, scratch=scratch)
    return [data.view(loc.entry.dtype).view(loc.entry.shape) for data, loc in zip(raw, locations, strict=True)]
