"""Dtype names people type, and the dtype a model runs in when none is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import open_checkpoint
from shardstate.io.reader import ReadAccount

if TYPE_CHECKING:
    from shardstate.config import ModelConfig
    from shardstate.store.model_dir import ModelDir

DTYPE_ALIASES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,  # safetensors' names (F32, F16, BF16), as the manifest writes them
    "f16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPE_ALIASES[name.lower()]
    except KeyError:
        choices = ", ".join(sorted({"float32", "float16", "bfloat16"}))
        raise ShardstateError(f"unknown dtype '{name}'", None, f"use one of {choices}") from None


def resolve_dtype(requested: str | None, config: ModelConfig, directory: ModelDir) -> torch.dtype:
    """What was asked for; else a sharded state's dtype (manifest, or a vLLM directory's weights); else
    config.json's; else the weights' (read as the loaders read them: in place for a checkpoint in S3)."""
    if requested and requested != "auto":
        return parse_dtype(requested)
    if directory.state is not None:  # a sharded state holds exactly one dtype
        return directory.state.dtype
    if config.dtype is not None:
        return config.dtype
    with ReadAccount(directory.remote_weights()) as account:
        headers = open_checkpoint(directory.path, account).headers
    for header in headers:
        for entry in header.tensors.values():
            if entry.dtype.is_floating_point:
                return entry.dtype
    return torch.float32
