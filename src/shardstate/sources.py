"""Whole checkpoint tensors for the converter, one parameter's worth at a time: read from a HF
checkpoint, or reassembled from every rank's slices of a sharded state (resharding). Reads go through
the load I/O engine into one scratch allocation reused for every parameter (faulted in once)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from shardstate.format.checkpoint import TensorLocation
from shardstate.format.sharded_state import check_specs, index_rank, warn_legacy
from shardstate.io.arena import Scratch
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import open_checked, read_entries
from shardstate.models import OpenedModel, build_on_meta
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
    """Each parameter is read from every TP rank's files of the sharded state (of the first stage holding
    it, at PP>1) and merged with the specs of the TP size it was saved at."""

    def __init__(self, model: OpenedModel, account: ReadAccount):
        state = model.directory.state
        assert state is not None
        if state.manifest is None:
            warn_legacy(state)
        self.tp_size = state.tp_size
        stages = [dict(build_on_meta(model.config, group, state.dtype, model.quantization).named_parameters())
                  for group in model.saved_stages()]  # as saved: specs at the saved TP size, each dtype
        if state.manifest is not None:
            check_specs(state.manifest, [{n: p.spec for n, p in params.items()} for params in stages],
                        state.manifest_path)
        # the parameter's source tensors -> (the parameter as saved, where each TP rank of the first stage
        # holding it has it); by sources, not name: a tied embedding is `lm_head.weight` where the head is
        # and `model.embed_tokens.weight` on a first stage without it
        self.saved: dict[tuple[str, ...], tuple[torch.Tensor, list[TensorLocation]]] = {}
        for stage, params in enumerate(stages):
            needs = {name: (tuple(p.shape), p.dtype) for name, p in params.items()}
            ranks = [index_rank(state, stage * self.tp_size + rank, needs, account) for rank in range(self.tp_size)]
            for name, param in params.items():
                self.saved.setdefault(tuple(sorted(param.spec.sources())),
                                      (param, [locations[name] for locations in ranks]))
        self.files = [path for rank in range(state.world_size) for path in state.rank_paths(rank)]
        self.account = account
        self.scratch = Scratch()

    def tensors_for(self, name: str, spec: ShardSpec) -> dict[str, torch.Tensor]:
        param, locations = self.saved[tuple(sorted(spec.sources()))]
        saved = param.spec
        whole = {source: torch.empty(shape, dtype=param.dtype) for source, shape in saved.sources().items()}
        local = read_entries(locations, self.account, self.scratch)
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
