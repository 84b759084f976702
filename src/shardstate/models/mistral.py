"""Mistral: Llama's layout with sliding-window attention (keys within the last `sliding_window` positions)."""

from __future__ import annotations

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM


class MistralForCausalLM(DecoderForCausalLM):
    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        return ModelConfig(**reader.common("MistralForCausalLM"), sliding_window=reader.sliding_window())
