"""Qwen2 / Qwen2.5: Llama's layout with biases on q, k and v (fused into qkv_proj.bias as the weights are)."""

from __future__ import annotations

from typing import ClassVar

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM


def no_sliding_window(reader: ConfigReader) -> None:
    """Qwen models ship with use_sliding_window false; per-layer windows (max_window_layers) are not built."""
    reader.unsupported("use_sliding_window", False, "per-layer sliding windows")


class Qwen2ForCausalLM(DecoderForCausalLM):
    DEFAULTS: ClassVar[dict] = {"num_key_value_heads": 32}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        no_sliding_window(reader)
        return ModelConfig(**reader.common("Qwen2ForCausalLM"), qkv_bias=True)
