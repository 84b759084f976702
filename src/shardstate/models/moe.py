"""Mixture-of-experts blocks in vLLM's layout. TP splits every expert's intermediate dim (vLLM's default,
not expert parallelism): `w13_weight [E, 2I/tp, H]` holds, per expert, [gate_r; up_r] and
`w2_weight [E, H, I/tp]` its down projection's columns, so each rank computes a partial sum for every
expert and the block all-reduces once (routed experts and shared expert together)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardstate import spec
from shardstate.config import ModelConfig
from shardstate.models.decoder import MLP
from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.layers import ReplicatedLinear, linear, sharded_parameter
from shardstate.spec import EXPERT, Part, ShardSpec


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (fp32), the top k, optionally renormalised to sum to 1 (transformers' routers);
    returns (weights in the logits' dtype, expert indices), both [tokens, top_k]."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, selected = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), selected


class RoutedExperts(nn.Module):
    """vLLM's fused expert weights. `names` are the checkpoint's per-expert (gate, up, down) tensor names
    with "{e}" for the expert index."""

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, names: tuple[str, str, str]):
        super().__init__()
        assert config.moe is not None
        tp, h, i, experts = group.size, config.hidden_size, config.moe.intermediate_size, config.moe.experts
        gate, up, down = names
        self.w13_weight = sharded_parameter(
            ShardSpec((Part(gate, (i, h), 0, tp), Part(up, (i, h), 0, tp)), tp, experts=experts), dtype)
        self.w2_weight = sharded_parameter(ShardSpec((Part(down, (h, i), 1, tp),), tp, experts=experts), dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum over the selected experts, [tokens, hidden]."""
        out = torch.zeros_like(x)
        w13_scale, w2_scale = getattr(self, "w13_weight_scale", None), getattr(self, "w2_weight_scale", None)
        for expert in torch.unique(selected).tolist():
            tokens, slot = torch.where(selected == expert)
            gate, up = linear(x[tokens], self.w13_weight[expert],
                              None if w13_scale is None else w13_scale[expert]).chunk(2, dim=-1)
            y = linear(F.silu(gate) * up, self.w2_weight[expert], None if w2_scale is None else w2_scale[expert])
            out.index_add_(0, tokens, y * weights[tokens, slot, None])
        return out


class SparseMoeBlock(nn.Module):
    """Router -> top-k routed experts (+ Qwen2-MoE's shared expert, scaled by sigmoid of its gate) -> one
    all-reduce. Where each piece lives follows vLLM's module names, which differ by family:
    `router_in_experts` (Qwen3-MoE keeps the router as `experts.gate`, the others as `gate`) and the
    shared expert as `experts._shared_experts._layer` with its gate as `expert_gate`."""

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 expert_names: tuple[str, str, str], router_in_experts: bool = False):
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.group, self.top_k, self.normalize = group, moe.top_k, moe.norm_topk_prob
        tp, h = group.size, config.hidden_size
        router = ReplicatedLinear(spec.replicated(f"{prefix}.gate.weight", (moe.experts, h), tp), dtype)
        self.experts = nn.Module()
        if router_in_experts:
            self.experts.gate = router
        else:
            self.gate = router
        self.experts.routed_experts = RoutedExperts(
            config, group, dtype, tuple(f"{prefix}.experts.{EXPERT}.{n}.weight" for n in expert_names))
        if moe.shared_intermediate_size:
            shared = MLP(config, group, dtype, f"{prefix}.shared_expert", moe.shared_intermediate_size, reduce=False)
            shared.expert_gate = ReplicatedLinear(
                spec.replicated(f"{prefix}.shared_expert_gate.weight", (1, h), tp), dtype)
            self.experts._shared_experts = nn.Module()
            self.experts._shared_experts._layer = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        router = self.experts.gate if hasattr(self.experts, "gate") else self.gate
        weights, selected = route(router(flat), self.top_k, self.normalize)
        out = self.experts.routed_experts(flat, weights, selected)
        if hasattr(self.experts, "_shared_experts"):
            shared = self.experts._shared_experts._layer
            out = out + torch.sigmoid(shared.expert_gate(flat)) * shared(flat)
        return self.group.all_reduce(out).reshape(x.shape)
