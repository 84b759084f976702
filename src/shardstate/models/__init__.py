"""TP model definitions. A model built on the meta device is the single source of truth for parameter
names, rank-local shapes and ShardSpecs."""

from __future__ import annotations

import torch

from shardstate.config import ModelConfig
from shardstate.models.llama import LlamaForCausalLM
from shardstate.runtime.distributed import TPGroup

ARCHITECTURES = {"LlamaForCausalLM": LlamaForCausalLM}


def build_on_meta(config: ModelConfig, group: TPGroup, dtype: torch.dtype) -> LlamaForCausalLM:
    """The rank's model with shapes and specs but no storage (nothing allocated, nothing initialised)."""
    config.check_tp_size(group.size)
    with torch.device("meta"):
        return ARCHITECTURES[config.architecture](config, group, dtype)
