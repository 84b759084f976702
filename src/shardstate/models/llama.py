"""Llama 2/3-style decoder (RMSNorm, RoPE, GQA, SiLU MLP) with vLLM's parameter names and layouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardstate import spec
from shardstate.config import ModelConfig
from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    ShardedWeight,
    VocabParallelEmbedding,
)


@dataclass
class KVCache:
    """Per layer keys and values, [batch, local kv heads, max_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, model: LlamaForCausalLM, batch: int, max_len: int) -> KVCache:
        attn = model.model.layers[0].self_attn
        param = attn.qkv_proj.weight
        shape = (batch, attn.local_kv_heads, max_len, attn.head_dim)
        n = len(model.model.layers)

        def make() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n)]

        return cls(make(), make())


@dataclass
class Step:
    """What every layer needs for one forward step besides its input and its cache."""

    cos_sin: tuple[torch.Tensor, torch.Tensor]  # RoPE tables for the step's positions
    mask: torch.Tensor  # [batch, 1, steps, cache_pos + steps] bool
    cache_pos: int  # where the step's keys and values go in the cache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed in fp32 as transformers does."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        freqs = positions.float().unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str):
        super().__init__()
        tp, d, h = group.size, config.head_dim, config.hidden_size
        n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
        kv_chunks = min(tp, n_kv)  # tp > n_kv: each kv head is replicated on tp // n_kv ranks (as vLLM)
        self.head_dim = d
        self.local_q_heads = n_q // tp
        self.local_kv_heads = n_kv // kv_chunks
        qkv = spec.fused(
            [
                (f"{prefix}.q_proj.weight", (n_q * d, h), tp),
                (f"{prefix}.k_proj.weight", (n_kv * d, h), kv_chunks),
                (f"{prefix}.v_proj.weight", (n_kv * d, h), kv_chunks),
            ],
            tp,
        )
        self.qkv_proj = ColumnParallelLinear(qkv, dtype)
        self.o_proj = RowParallelLinear(spec.split(f"{prefix}.o_proj.weight", (h, n_q * d), 1, tp), dtype, group)

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.local_q_heads * self.head_dim, self.local_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.local_q_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.local_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (c.unsqueeze(1) for c in step.cos_sin)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = cache
        end = step.cache_pos + t
        k_cache[:, :, step.cache_pos : end] = k
        v_cache[:, :, step.cache_pos : end] = v
        repeat = self.local_q_heads // self.local_kv_heads
        keys = k_cache[:, :, :end].repeat_interleave(repeat, dim=1)
        values = v_cache[:, :, :end].repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str):
        super().__init__()
        tp, h, i = group.size, config.hidden_size, config.intermediate_size
        gate_up = spec.fused(
            [(f"{prefix}.gate_proj.weight", (i, h), tp), (f"{prefix}.up_proj.weight", (i, h), tp)], tp
        )
        self.gate_up_proj = ColumnParallelLinear(gate_up, dtype)
        self.down_proj = RowParallelLinear(spec.split(f"{prefix}.down_proj.weight", (h, i), 1, tp), dtype, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str):
        super().__init__()
        norm_shape, tp, eps = (config.hidden_size,), group.size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(spec.replicated(f"{prefix}.input_layernorm.weight", norm_shape, tp), dtype, eps)
        self.self_attn = Attention(config, group, dtype, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(
            spec.replicated(f"{prefix}.post_attention_layernorm.weight", norm_shape, tp), dtype, eps
        )
        self.mlp = MLP(config, group, dtype, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype):
        super().__init__()
        tp, vocab_shape = group.size, (config.vocab_size, config.hidden_size)
        self.embed_tokens = VocabParallelEmbedding(
            spec.vocab("model.embed_tokens.weight", vocab_shape, config.padded_vocab_size, tp), dtype, group
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, group, dtype, f"model.layers.{n}") for n in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(spec.replicated("model.norm.weight", (config.hidden_size,), tp), dtype, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)


class LlamaForCausalLM(nn.Module):
    """Rank-local Llama. `shard_specs()` maps vLLM parameter names to the specs that fill them."""

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.group = group
        head_source = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        vocab_shape = (config.vocab_size, config.hidden_size)
        head_spec = spec.vocab(head_source, vocab_shape, config.padded_vocab_size, group.size)
        if config.tie_word_embeddings:
            # vLLM keeps tied embeddings as `lm_head.weight` (the smaller key of tensors sharing storage) and
            # its sharded_state loader asks for that name: registered first, the head names the parameter
            self.lm_head = ParallelLMHead(head_spec, dtype, group, config.vocab_size)
            self.model = LlamaModel(config, group, dtype)
            self.model.embed_tokens.weight = self.lm_head.weight
        else:
            self.model = LlamaModel(config, group, dtype)
            self.lm_head = ParallelLMHead(head_spec, dtype, group, config.vocab_size)

    def shard_specs(self) -> dict[str, spec.ShardSpec]:
        """Parameter name -> spec, one entry per distinct parameter (a tied lm_head is not repeated)."""
        owners: dict[int, spec.ShardSpec] = {}
        for module in self.modules():
            if isinstance(module, ShardedWeight):
                owners.setdefault(id(module.weight), module.spec)
        return {name: owners[id(p)] for name, p in self.named_parameters()}

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        cache_pos: int,
    ) -> torch.Tensor:
        """Logits for the last position of each sequence, [batch, vocab]."""
        x = self.model.embed_tokens(ids)
        step = Step(self.model.rotary(positions, x.dtype), mask, cache_pos)
        for n, layer in enumerate(self.model.layers):
            x = layer(x, step, (cache.keys[n], cache.values[n]))
        return self.lm_head(self.model.norm(x[:, -1]))
