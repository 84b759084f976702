"""Dtype names people type (and config.json and the manifest write)."""

from __future__ import annotations

import torch

from shardstate.errors import ShardstateError

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
