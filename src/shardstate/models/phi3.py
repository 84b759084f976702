"""Phi-3: the checkpoint holds q, k, v fused as `qkv_proj` and gate, up as `gate_up_proj`; each rank's
parameters are cut from regions of those (vLLM's rank-local layout is Llama's). Sliding-window attention
when config.json sets one."""

from __future__ import annotations

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    fused_checkpoint = True

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        rope = reader.cfg.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
        if reader.cfg.get("partial_rotary_factor", factor) != 1.0 or factor != 1.0:
            raise reader.refuse(f"partial_rotary_factor {factor} is not supported yet",
                                "use a model with full rotary embeddings")
        return ModelConfig(**reader.common("Phi3ForCausalLM"), sliding_window=reader.sliding_window())
