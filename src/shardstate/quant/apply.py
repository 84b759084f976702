"""Quantize a loaded rank's linear weights in place (the seed's "quantize after load"). Each quantized
weight keeps its name and spec and gains `<name>_scale` [..., N, 1] fp32. Where the spec splits a weight's
input dim across ranks (row-parallel layers, MoE down projections), the ranks all-reduce their partial row
maxima first, so every rank's scales are those of the whole row."""

from __future__ import annotations

import torch
from torch import nn

from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.layers import (
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    ShardedWeight,
    VocabParallelEmbedding,
    spec_parameter,
)
from shardstate.quant.methods import QuantMethod, row_absmax
from shardstate.spec import Part, ShardSpec

QUANTIZED_NAMES = ("weight", "w13_weight", "w2_weight")  # linear layers' and fused experts' weights


def splits_input_dim(spec: ShardSpec) -> bool:
    """Whether a rank holds only part of each output row (a part cut along the last dim)."""
    return any(part.chunks > 1 and part.dim == len(part.shape) - 1 for part in spec.parts)


def scale_spec(spec: ShardSpec) -> ShardSpec:
    """The spec of a weight's scales: the weight's rows, one column, never split along it. Its sources are
    the weights' names with `_scale` appended (they exist in quantized states, not in HF checkpoints)."""
    parts = []
    for part in spec.parts:
        last = len(part.shape) - 1
        shape = (*part.shape[:last], 1)
        box = None if part.box is None else (*part.box[:last], (0, 1))
        dim, chunks = (part.dim, part.chunks) if part.dim != last else (0, 1)
        padded = part.padded if part.dim != last else None
        parts.append(Part(f"{part.source}_scale", shape, dim, chunks, padded, box))
    return ShardSpec(tuple(parts), spec.tp_size, spec.join_dim, spec.experts)


def quantizable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every column/row-parallel linear weight and fused expert weight;
    embeddings, the LM head, norms and routers keep the model dtype."""
    kept = (ReplicatedLinear, ParallelLMHead, RMSNorm, VocabParallelEmbedding)
    found = []
    for module in model.modules():
        if isinstance(module, kept):
            continue
        for name in QUANTIZED_NAMES:
            if module._parameters.get(name) is not None and (isinstance(module, ShardedWeight) or name != "weight"):
                found.append((module, name))
    return found


def quantize_linear_weights(model: nn.Module, method: QuantMethod, group: TPGroup) -> None:
    """Quantize the loaded weights in place: each keeps its name and spec and gains `<name>_scale`."""
    for module, name in quantizable(model):
        weight = getattr(module, name)
        absmax = row_absmax(weight)
        if splits_input_dim(weight.spec):
            group.all_reduce_max(absmax)
        scale = method.scales(absmax)
        setattr(module, name, spec_parameter(method.quantize(weight, scale), weight.spec))
        setattr(module, f"{name}_scale", spec_parameter(scale, scale_spec(weight.spec)))
    release_load_buffers(model)


def release_load_buffers(model: nn.Module) -> None:
    """The sharded loader makes parameters views of the memory it read into; once the linear weights are
    quantized copies, the parameters kept as loaded (norms, embeddings) would hold that whole buffer alive:
    copy them out of it."""
    for param in model.parameters():
        if param.untyped_storage().nbytes() > param.numel() * param.element_size():
            param.data = param.data.clone()


def declare_quantized(model: nn.Module, method: QuantMethod) -> None:
    """Give a model (on the meta device) the parameters a quantized state holds: what
    `quantize_linear_weights` makes, in the same order, without values."""
    for module, name in quantizable(model):
        weight = getattr(module, name)
        quantized = torch.empty(weight.shape, dtype=method.dtype, device=weight.device)
        scale = torch.empty((*weight.shape[:-1], 1), dtype=torch.float32, device=weight.device)
        setattr(module, name, spec_parameter(quantized, weight.spec))
        setattr(module, f"{name}_scale", spec_parameter(scale, scale_spec(weight.spec)))


def quantize_whole(tensor: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole checkpoint tensor's quantized values and scales (offline: every row is whole)."""
    scale = method.scales(row_absmax(tensor))
    return method.quantize(tensor, scale), scale
