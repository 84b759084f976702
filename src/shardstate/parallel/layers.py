"""Tensor-parallel layers. Each parameter is rank-local and carries the ShardSpec that fills it
(`param.spec`, as vLLM keeps loader attributes on parameters); built on the meta device, parameters get
storage from `materialize` and values from a loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardstate.io.arena import Scratch, align_up
from shardstate.parallel.distributed import TPGroup
from shardstate.spec import ShardSpec


def sharded_parameter(spec: ShardSpec, dtype: torch.dtype) -> nn.Parameter:
    """A rank-local parameter shaped by `spec`, which it carries as `.spec`."""
    return spec_parameter(torch.empty(spec.local_shape(), dtype=dtype), spec)


def spec_parameter(data: torch.Tensor, spec: ShardSpec) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.spec = spec
    return param


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). A quantized weight (quant/) [N, K] with fp32 per-row scales [N, 1] is not
    dequantized in bf16/fp32: the product with its values (exact there) is multiplied by the scales in
    fp32, x @ (q * s).T = (x @ q.T) * s.T. On CPU, int8 uses torch's weight-only int8 kernel (with unit
    scales: it would round ours to the activation dtype; only for K % 32 == 0, where it is right for bf16
    too). fp16 cannot hold the unscaled product (up to qmax times the output): it dequantizes first."""
    if scale is None:
        return F.linear(x, weight, bias)
    if x.dtype == torch.float16:
        return F.linear(x, (weight.float() * scale).to(x.dtype), bias)
    if weight.dtype == torch.int8 and x.device.type == "cpu" and x.shape[-1] % 32 == 0:
        ones = torch.ones(weight.shape[0], dtype=x.dtype)
        product = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight, ones)
        product = product.view(*x.shape[:-1], weight.shape[0])
    else:
        product = F.linear(x, weight.to(x.dtype))
    y = (product.float() * scale.view(-1)).to(x.dtype)
    return y if bias is None else y + bias


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Parameter name -> spec, one entry per distinct parameter (a tied one under its first name)."""
    return {name: param.spec for name, param in model.named_parameters()}


class ShardedWeight(nn.Module):
    """Base for layers with a weight (and optionally a bias) described by specs."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype, bias: ShardSpec | None = None):
        super().__init__()
        self.weight = sharded_parameter(spec, dtype)
        self.bias = None if bias is None else sharded_parameter(bias, dtype)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias), through the weight's scales when it is quantized."""
        return linear(x, self.weight, getattr(self, "weight_scale", None), bias)


class RMSNorm(ShardedWeight):
    def __init__(self, spec: ShardSpec, dtype: torch.dtype, eps: float):
        super().__init__(spec, dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers does: normalise in fp32, cast back, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class ColumnParallelLinear(ShardedWeight):
    """Output features split across ranks (also the fused qkv and gate_up projections); no communication."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


class ReplicatedLinear(ShardedWeight):
    """The whole weight on every rank (MoE routers, Qwen2-MoE's shared-expert gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(ShardedWeight):
    """Input features split across ranks; partial products summed with all-reduce (or left to the caller
    with `reduce` False, when it sums several partial results at once)."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype, group: TPGroup, reduce: bool = True):
        super().__init__(spec, dtype)
        self.group = group
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.project(x)
        return self.group.all_reduce(partial) if self.reduce else partial


class VocabParallelEmbedding(ShardedWeight):
    """Rank r holds rows [r * n, (r + 1) * n) of the padded vocabulary; other ids contribute zeros."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype, group: TPGroup):
        super().__init__(spec, dtype)
        self.group = group
        self.rows = self.weight.shape[0]
        self.first = group.rank * self.rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(out)


class ParallelLMHead(ShardedWeight):
    """Logits for the rank's vocabulary rows, gathered across ranks and trimmed to the real vocabulary.
    With tied embeddings the model points `weight` at the embedding's parameter."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype, group: TPGroup, vocab_size: int):
        super().__init__(spec, dtype)
        self.group = group
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        return self.group.all_gather_last_dim(logits)[..., : self.vocab_size]


def _storage_layout(model: nn.Module) -> tuple[dict[int, int], int]:
    """Each distinct parameter's byte offset in one allocation (64-byte aligned), and its size."""
    offsets, total = {}, 0
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in offsets:
                offsets[id(param)] = total
                total = align_up(total + param.numel() * param.element_size(), 64)
    return offsets, total


def parameter_bytes(model: nn.Module) -> int:
    """What `materialize` takes from its `memory` for `model` (tied parameters once)."""
    return _storage_layout(model)[1]


def materialize(model: nn.Module, device: torch.device, memory: Scratch | None = None) -> None:
    """Give every meta parameter uninitialised storage on `device`, keeping tied parameters tied.
    (nn.Module.to_empty would untie them.) With `memory` (on the CPU), the parameters are views of one
    arena from it: a worker's load memory, reserved and faulted in while it started (io/arena.py)."""
    offsets, total = _storage_layout(model)
    arena = memory.arena(total).tensor if memory is not None else None
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in fresh:
                if arena is None:
                    storage = torch.empty(param.shape, dtype=param.dtype, device=device)
                else:
                    at = offsets[id(param)]
                    nbytes = param.numel() * param.element_size()
                    storage = arena[at : at + nbytes].view(param.dtype).view(param.shape)
                fresh[id(param)] = nn.Parameter(storage, requires_grad=False)
                fresh[id(param)].spec = param.spec
            module._parameters[name] = fresh[id(param)]
