"""Mixtral: Mistral's attention with a sparse MoE block (`block_sparse_moe`): experts w1 (gate), w3 (up),
w2 (down) of intermediate_size each, top-k routing renormalised to sum to 1."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from shardstate.config import ConfigReader, ModelConfig
from shardstate.models.decoder import DecoderForCausalLM
from shardstate.models.moe import SparseMoeBlock
from shardstate.parallel.distributed import TPGroup


class MixtralForCausalLM(DecoderForCausalLM):
    ends_on_every_stage = True  # vLLM 0.32 builds its embedding, norm and LM head on every PP stage
    DEFAULTS: ClassVar[dict] = {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                                "num_local_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True}

    @staticmethod
    def parse_config(reader: ConfigReader) -> ModelConfig:
        moe = reader.moe("num_local_experts", "intermediate_size")
        if not moe.norm_topk_prob or moe.dense_layers:
            raise reader.refuse("a Mixtral config with norm_topk_prob false or dense layers",
                                "use a Mixtral config as released")
        return ModelConfig(**reader.common("MixtralForCausalLM"), sliding_window=reader.sliding_window(), moe=moe)

    @classmethod
    def make_mlp(cls, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 index: int) -> tuple[str, nn.Module]:
        block = SparseMoeBlock(config, group, dtype, f"{prefix}.block_sparse_moe", ("w1", "w3", "w2"))
        return "block_sparse_moe", block
