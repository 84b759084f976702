"""Qwen3-MoE: Qwen3's attention (q/k norms; head_dim hidden/heads unless config.json says) with routed
experts; vLLM keeps the router inside the experts module (`mlp.experts.gate`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM
from shardstate.models.moe import SparseMoeBlock
from shardstate.models.qwen2 import no_sliding_window
from shardstate.models.qwen2_moe import QWEN_EXPERTS, experts_key
from shardstate.parallel.distributed import TPGroup


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    ends_on_every_stage = True  # vLLM 0.32 builds its embedding, norm and LM head on every PP stage
    DEFAULTS: ClassVar[dict] = {"num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8,
                                "moe_intermediate_size": 768}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        no_sliding_window(reader)
        moe = reader.moe(experts_key(reader), "moe_intermediate_size")
        return ModelConfig(**reader.common("Qwen3MoeForCausalLM"), qk_norm=True, moe=moe)

    @classmethod
    def make_mlp(cls, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 index: int) -> tuple[str, nn.Module]:
        if config.moe is None or index in config.moe.dense_layers:
            return super().make_mlp(config, group, dtype, prefix, index)
        return "mlp", SparseMoeBlock(config, group, dtype, f"{prefix}.mlp", QWEN_EXPERTS, router_in_experts=True)
