"""Qwen2-MoE (Qwen1.5-MoE): Qwen2's attention (qkv bias); sparse layers have routed experts plus a shared
expert whose output is scaled by sigmoid(shared_expert_gate(x)); mlp_only_layers / decoder_sparse_step
layers keep a plain MLP."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM
from shardstate.models.moe import SparseMoeBlock
from shardstate.models.qwen2 import no_sliding_window
from shardstate.parallel.distributed import TPGroup

QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")


def experts_key(reader: ConfigReader) -> str:
    """Released configs say num_experts; transformers 5 writes num_local_experts for some families."""
    local = reader.cfg.get("num_experts") is None and reader.cfg.get("num_local_experts") is not None
    return "num_local_experts" if local else "num_experts"


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    ends_on_every_stage = True  # vLLM 0.32 builds its embedding, norm and LM head on every PP stage
    DEFAULTS: ClassVar[dict] = {"num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
                                "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        no_sliding_window(reader)
        moe = reader.moe(experts_key(reader), "moe_intermediate_size", shared_key="shared_expert_intermediate_size")
        return ModelConfig(**reader.common("Qwen2MoeForCausalLM"), qkv_bias=reader.flag("qkv_bias", True), moe=moe)

    @classmethod
    def make_mlp(cls, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 index: int) -> tuple[str, nn.Module]:
        if config.moe is None or index in config.moe.dense_layers:
            return super().make_mlp(config, group, dtype, prefix, index)
        return "mlp", SparseMoeBlock(config, group, dtype, f"{prefix}.mlp", QWEN_EXPERTS)
