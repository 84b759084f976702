"""Whole checkpoint tensors for the converter, one parameter's worth at a time: read from a HF
checkpoint, or reassembled from every rank's slices of a sharded state (resharding). Reads go through
the load I/O engine into one scratch allocation reused for every parameter (faulted in once)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from shardstate.format.sharded_state import check_specs, index_rank, warn_legacy
from shardstate.io.engine import Scratch
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import open_checked, read_entries
from shardstate.models import OpenedModel, build_on_meta
from shardstate.parallel.distributed import TPGroup
from shardstate.quant.apply import quantize_whole
from shardstate.quant.methods import QuantMethod
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

    def __init__(self, model: OpenedModel, account: ReadAccount):
        state = model.directory.state
        assert state is not None
        if state.manifest is None:
            warn_legacy(state)
        self.tp_size = state.tp_size
        saved = build_on_meta(model.config, TPGroup(0, self.tp_size), state.dtype, model.quantization)
        self.params = dict(saved.named_parameters())  # as saved: specs at the saved TP size, each dtype
        self.specs = {name: p.spec for name, p in self.params.items()}
        if state.manifest is not None:
            check_specs(state.manifest, self.specs, state.manifest_path)
        needs = {name: (tuple(p.shape), p.dtype) for name, p in self.params.items()}
        self.locations = [index_rank(state, rank, needs, account) for rank in range(self.tp_size)]
        self.files = [path for rank in range(self.tp_size) for path in state.rank_paths(rank)]
        self.account = account
        self.scratch = Scratch()

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        saved, dtype = self.specs[name], self.params[name].dtype
        whole = {source: torch.empty(shape, dtype=dtype) for source, shape in saved.sources().items()}
        local = read_entries([locations[name] for locations in self.locations], self.account, self.scratch)
        for rank, tensor in enumerate(local):
            saved.put(rank, tensor, whole)
        return whole


class QuantizingSource:
    """Another source's tensors, the weights among them quantized whole (cast to the model dtype first, as
    the workers' loaded weights are, so that `convert --quantize` writes what `save --quantize` does); a
    weight's scales are served when its `_scale` parameter comes next."""

    def __init__(self, inner: TensorSource, method: QuantMethod, dtype: torch.dtype, quantized: set[str]):
        self.inner, self.method, self.dtype, self.quantized = inner, method, dtype, quantized
        self.files = inner.files
        self.scales: dict[str, torch.Tensor] = {}

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        if name.endswith("_scale") and name.removesuffix("_scale") in self.quantized:
            return {source: self.scales.pop(source) for source in spec.sources()}
        whole = self.inner.tensors_for(name, spec)
        if name not in self.quantized:
            return whole
        quantized = {}
        for source, tensor in whole.items():
            quantized[source], self.scales[f"{source}_scale"] = quantize_whole(tensor.to(self.dtype), self.method)
        return quantized
