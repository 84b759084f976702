"""Llama 2/3 and Llama-architecture models (SmolLM2, ...): the shared decoder as it is."""

from __future__ import annotations

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        return ModelConfig(**reader.common("LlamaForCausalLM"))
