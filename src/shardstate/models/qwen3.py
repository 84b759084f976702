"""Qwen3: Llama's layout with an RMSNorm of each head's q and k (q_norm, k_norm) before RoPE; head_dim
is 128 when config.json does not say (transformers' default for the family)."""

from __future__ import annotations

from typing import ClassVar

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM
from shardstate.models.qwen2 import no_sliding_window


class Qwen3ForCausalLM(DecoderForCausalLM):
    DEFAULTS: ClassVar[dict] = {"num_key_value_heads": 32, "head_dim": 128}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        no_sliding_window(reader)
        return ModelConfig(**reader.common("Qwen3ForCausalLM"), qk_norm=True)
