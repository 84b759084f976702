"""Mistral: Llama's layout with sliding-window attention (keys within the last `sliding_window` positions)."""

from __future__ import annotations

from typing import ClassVar

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM


class MistralForCausalLM(DecoderForCausalLM):
    DEFAULTS: ClassVar[dict] = {"num_key_value_heads": 8, "sliding_window": 4096}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        return ModelConfig(**reader.common("MistralForCausalLM"), sliding_window=reader.sliding_window())
