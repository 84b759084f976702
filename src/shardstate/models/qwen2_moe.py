"""Qwen2-MoE (Qwen1.5-MoE): Qwen2's attention (qkv bias); sparse layers have routed experts plus a shared
expert whose output is scaled by sigmoid(shared_expert_gate(x)); mlp_only_layers / decoder_sparse_step
layers keep a plain MLP."""

from __future__ import annotations

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
    return "num_experts" if reader.cfg.get("num_experts") is not None else "num_local_experts"


class Qwen2MoeForCausalLM(DecoderForCausalLM):
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
