"""Phi-3: the checkpoint holds q, k, v fused as `qkv_proj` and gate, up as `gate_up_proj`; each rank's
parameters are cut from regions of those (vLLM's rank-local layout is Llama's). Sliding-window attention
when config.json sets one."""

from __future__ import annotations

from typing import ClassVar

from shardstate.config import ConfigReader, ModelConfig
from shardstate.errors import brief
from shardstate.models.decoder import DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    fused_checkpoint = True
    DEFAULTS: ClassVar[dict] = {"rms_norm_eps": 1e-5}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        for factor in (reader.cfg.get("partial_rotary_factor"), reader.rope_dict().get("partial_rotary_factor")):
            if factor not in (None, 1, 1.0):
                raise reader.refuse(f"partial_rotary_factor {brief(factor)} is not supported yet",
                                    "use a model with full rotary embeddings")
        return ModelConfig(**reader.common("Phi3ForCausalLM"), sliding_window=reader.sliding_window())
