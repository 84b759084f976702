"""Tensor-parallel layers. Each holds its weight as a rank-local parameter described by a ShardSpec;
built on the meta device, they get storage from `materialize` and values from a loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardstate.parallel.distributed import TPGroup
from shardstate.spec import ShardSpec


class ShardedWeight(nn.Module):
    """Base for layers with one weight described by `spec`."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.local_shape(), dtype=dtype), requires_grad=False)


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
        return F.linear(x, self.weight)


class RowParallelLinear(ShardedWeight):
    """Input features split across ranks; partial products summed with all-reduce."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype, group: TPGroup):
        super().__init__(spec, dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(ShardedWeight):
    """Rank r holds rows [r * n, (r + 1) * n) of the padded vocabulary; other ids contribute zeros."""

    def __init__(self, spec: ShardSpec, dtype: torch.dtype, group: TPGroup):
        super().__init__(spec, dtype)
        self.group = group
        self.rows = spec.local_shape()[0]
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


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter uninitialised storage on `device`, keeping tied parameters tied.
    (nn.Module.to_empty would untie them.)"""
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in fresh:
                fresh[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False
                )
            module._parameters[name] = fresh[id(param)]
