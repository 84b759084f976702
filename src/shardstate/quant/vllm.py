"""What vLLM needs to load a quantized sharded state (`--for-vllm`): a compressed-tensors
`quantization_config` in config.json, and per attention layer the tensors vLLM's compressed-tensors
KV-cache method registers (placeholders: the KV cache itself stays unquantized).

The weights and scales are shardstate's own, unchanged (`weight` int8/fp8 [N_r, K_r], `weight_scale` F32
[N_r, 1], fused experts' `w13_weight_scale`/`w2_weight_scale`). vLLM 0.32 has no weight-only int8/fp8
kernel for that layout on CPU, so the config declares W8A8 (channel weights, activations quantized per
token as vLLM computes): vLLM then computes with the same weights, but not shardstate's numerics."""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from shardstate.parallel.layers import ReplicatedLinear

QUANTIZATION_CONFIG = "quantization_config"
KV_PLACEHOLDERS = (("q_scale", 1.0), ("k_scale", 1.0), ("v_scale", 1.0),
                   ("q_zero_point", 0.0), ("k_zero_point", 0.0), ("v_zero_point", 0.0))
NUM_TYPES = {"int8": "int", "fp8": "float"}  # quantization method -> compressed-tensors' number type


def declares_quantization(config: dict) -> bool:
    return QUANTIZATION_CONFIG in config


def kv_placeholders(num_layers: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, float]]:
    """(name, dtype, value) of each [1] tensor: scales F32, zero points in the model's dtype (as vLLM
    creates them)."""
    return [(f"model.layers.{n}.self_attn.attn.{name}", torch.float32 if name.endswith("scale") else dtype, value)
            for n in range(num_layers) for name, value in KV_PLACEHOLDERS]


def unquantized_linear_patterns(model: nn.Module) -> list[str]:
    """compressed-tensors `ignore` entries for the linear layers that keep the model dtype (the LM head,
    routers, the shared-expert gate), one regex per name with its layer number generalised."""
    patterns = ["lm_head"]
    for name, module in model.named_modules():
        if isinstance(module, ReplicatedLinear):
            generic = re.sub(r"layers\\\.\d+\\\.", lambda _: r"layers\.\d+\.", re.escape(name))
            patterns.append(f"re:{generic}$")
    return list(dict.fromkeys(patterns))


def compressed_tensors_config(method: str, ignore: list[str]) -> dict:
    """W8A8 for vLLM: symmetric channel weights as stored, dynamic per-token activations."""
    number = NUM_TYPES[method]
    scheme = {"num_bits": 8, "type": number, "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": f"{number}-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**scheme, "strategy": "channel", "dynamic": False},
            "input_activations": {**scheme, "strategy": "token", "dynamic": True},
        }},
        "ignore": ignore,
    }


def with_quantization_config(config: dict, method: str, model: nn.Module) -> bytes:
    """config.json's text for vLLM: the source's keys, in order, plus `quantization_config`."""
    quantization = compressed_tensors_config(method, unquantized_linear_patterns(model))
    return (json.dumps({**config, QUANTIZATION_CONFIG: quantization}, indent=2) + "\n").encode()
