"""The decoder every family shares (RMSNorm, RoPE, GQA attention, SiLU MLP) with vLLM's parameter names
and rank-local layouts. A family (models/<family>.py) chooses what differs: qkv bias, q/k norms, fused
checkpoint tensors (Phi-3), the MLP block (mixture of experts), the names of its modules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shardstate import spec
from shardstate.config import ModelConfig, Rope
from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_specs,
)
from shardstate.spec import Part, ShardSpec


@dataclass
class KVCache:
    """Per layer keys and values, [batch, local kv heads, max_len, head_dim]; by global layer index, empty
    for the layers other stages hold."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, model: DecoderForCausalLM, batch: int, max_len: int) -> KVCache:
        held = model.model.held
        norm = model.model.layers[held[0]].input_layernorm.weight  # the compute dtype (linear weights may be
        attn = model.model.layers[held[0]].self_attn  # quantized), on the model's device
        shape = (batch, attn.local_kv_heads, max_len, attn.head_dim)

        def make() -> list[torch.Tensor]:
            return [torch.zeros(shape if n in held else (0,), dtype=norm.dtype, device=norm.device)
                    for n in range(len(model.model.layers))]

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


def inverse_frequencies(head_dim: int, rope: Rope) -> torch.Tensor:
    """RoPE's inverse frequencies in fp32, scaled as config.json's rope type asks (transformers' formulas)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float()
    inv_freq = 1.0 / (rope.theta ** (exponents / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth blend between
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed in fp32 as transformers does."""

    def __init__(self, head_dim: int, rope: Rope):
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inverse_frequencies(self.head_dim, self.rope).to(positions.device)
        freqs = positions.float().unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def column_parts(sources: list[tuple[str, int, int]], fused_source: str | None, tail: tuple[int, ...],
                 tp: int) -> ShardSpec:
    """A column-parallel parameter joining several checkpoint tensors, each split on dim 0: `sources` are
    (name, rows, chunks). With `fused_source`, the checkpoint holds them as consecutive row blocks of one
    tensor of that name (Phi-3's qkv_proj, gate_up_proj), cut into regions."""
    if fused_source is None:
        return spec.fused([(name, (rows, *tail), chunks) for name, rows, chunks in sources], tp)
    shape = (sum(rows for _, rows, _ in sources), *tail)
    parts, first = [], 0
    for _, rows, chunks in sources:
        parts.append(Part(fused_source, shape, 0, chunks, box=((first, rows), *((0, n) for n in tail))))
        first += rows
    return ShardSpec(tuple(parts), tp)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 fused_checkpoint: bool = False):
        super().__init__()
        tp, d, h = group.size, config.head_dim, config.hidden_size
        n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
        kv_chunks = min(tp, n_kv)  # tp > n_kv: each kv head is replicated on tp // n_kv ranks (as vLLM)
        self.head_dim = d
        self.local_q_heads = n_q // tp
        self.local_kv_heads = n_kv // kv_chunks

        def qkv(kind: str, tail: tuple[int, ...]) -> ShardSpec:
            names = [(f"{prefix}.{p}_proj.{kind}", n * d, c) for p, n, c in
                     (("q", n_q, tp), ("k", n_kv, kv_chunks), ("v", n_kv, kv_chunks))]
            return column_parts(names, f"{prefix}.qkv_proj.{kind}" if fused_checkpoint else None, tail, tp)

        self.qkv_proj = ColumnParallelLinear(qkv("weight", (h,)), dtype, qkv("bias", ()) if config.qkv_bias else None)
        self.o_proj = RowParallelLinear(spec.split(f"{prefix}.o_proj.weight", (h, n_q * d), 1, tp), dtype, group)
        if config.qk_norm:
            self.q_norm = RMSNorm(spec.replicated(f"{prefix}.q_norm.weight", (d,), tp), dtype, config.rms_norm_eps)
            self.k_norm = RMSNorm(spec.replicated(f"{prefix}.k_norm.weight", (d,), tp), dtype, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.local_q_heads * self.head_dim, self.local_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.local_q_heads, self.head_dim)
        k = k.view(b, t, self.local_kv_heads, self.head_dim)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
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
    """SiLU-gated MLP: gate_up_proj = [gate_r; up_r], down_proj split on dim 1. With `reduce` False the
    output is this rank's partial sum (a mixture-of-experts block sums once for all its parts)."""

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str, intermediate: int,
                 fused_checkpoint: bool = False, reduce: bool = True):
        super().__init__()
        tp, h = group.size, config.hidden_size
        gate_up = column_parts([(f"{prefix}.gate_proj.weight", intermediate, tp),
                                (f"{prefix}.up_proj.weight", intermediate, tp)],
                               f"{prefix}.gate_up_proj.weight" if fused_checkpoint else None, (h,), tp)
        self.gate_up_proj = ColumnParallelLinear(gate_up, dtype)
        self.down_proj = RowParallelLinear(spec.split(f"{prefix}.down_proj.weight", (h, intermediate), 1, tp),
                                           dtype, group, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 family: type[DecoderForCausalLM], index: int):
        super().__init__()
        norm_shape, tp, eps = (config.hidden_size,), group.size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(spec.replicated(f"{prefix}.input_layernorm.weight", norm_shape, tp), dtype, eps)
        self.self_attn = Attention(config, group, dtype, f"{prefix}.self_attn", family.fused_checkpoint)
        self.post_attention_layernorm = RMSNorm(
            spec.replicated(f"{prefix}.post_attention_layernorm.weight", norm_shape, tp), dtype, eps
        )
        self.mlp_name, mlp = family.make_mlp(config, group, dtype, prefix, index)
        setattr(self, self.mlp_name, mlp)

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))


class MissingLayer(nn.Identity):
    """A layer another pipeline stage holds (vLLM's PPMissingLayer): no parameters, so the stage's own
    layers keep their global names (`model.layers.5...` on stage 1)."""


class DecoderModel(nn.Module):
    """The stage's part of the decoder: its layers (`held`), the embedding and the final norm where
    `embed` and `norm` say (None elsewhere)."""

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype, family: type[DecoderForCausalLM],
                 embed: bool = True, norm: bool = True):
        super().__init__()
        tp, vocab_shape = group.size, (config.vocab_size, config.hidden_size)
        self.embed_tokens = VocabParallelEmbedding(
            spec.vocab("model.embed_tokens.weight", vocab_shape, config.padded_vocab_size, tp), dtype, group
        ) if embed else None
        self.held = group.stage_layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            DecoderLayer(config, group, dtype, f"model.layers.{n}", family, n) if n in self.held else MissingLayer()
            for n in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(spec.replicated("model.norm.weight", (config.hidden_size,), tp), dtype,
                            config.rms_norm_eps) if norm else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope)


class DecoderForCausalLM(nn.Module):
    """A rank-local decoder. `shard_specs()` maps vLLM parameter names to the specs that fill them.
    Families subclass it: `parse_config`, `DEFAULTS`, `fused_checkpoint` (the checkpoint fuses qkv and
    gate_up) and `make_mlp`."""

    fused_checkpoint = False
    # vLLM 0.32 builds the embedding, the final norm and the LM head on every PP stage for some families
    # (its Mixtral, Qwen2-MoE, Qwen3-MoE), so its sharded_state files hold them on every stage; others
    # have the embedding on the first stage (and the last, tied to the head) and the norm and head on the last
    ends_on_every_stage = False
    DEFAULTS: ClassVar[dict] = {}  # config.json values when a key is absent: transformers' defaults for the family

    @classmethod
    def make_mlp(cls, config: ModelConfig, group: TPGroup, dtype: torch.dtype, prefix: str,
                 index: int) -> tuple[str, nn.Module]:
        """The layer's MLP block and the attribute (vLLM's module name) it lives under."""
        return "mlp", MLP(config, group, dtype, f"{prefix}.mlp", config.intermediate_size, cls.fused_checkpoint)

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.group = group
        self.dtype = dtype  # the compute dtype (linear weights may be quantized)
        tied, everywhere = config.tie_word_embeddings, self.ends_on_every_stage
        head = group.last_stage or everywhere
        embed = group.first_stage or everywhere or (tied and head)
        head_source = "model.embed_tokens.weight" if tied else "lm_head.weight"
        vocab_shape = (config.vocab_size, config.hidden_size)
        head_spec = spec.vocab(head_source, vocab_shape, config.padded_vocab_size, group.size)
        if tied and head:
            # vLLM keeps tied embeddings as `lm_head.weight` (the smaller key of tensors sharing storage) and
            # its sharded_state loader asks for that name: registered first, the head names the parameter
            self.lm_head = ParallelLMHead(head_spec, dtype, group, config.vocab_size)
            self.model = DecoderModel(config, group, dtype, type(self), embed, head)
            self.model.embed_tokens.weight = self.lm_head.weight
        else:
            self.model = DecoderModel(config, group, dtype, type(self), embed, head)
            self.lm_head = ParallelLMHead(head_spec, dtype, group, config.vocab_size) if head else None

    def shard_specs(self) -> dict[str, ShardSpec]:
        return shard_specs(self)

    def checkpoint_sources(self) -> set[str]:
        """Every checkpoint tensor the whole model (all pipeline stages) is cut from."""
        with torch.device("meta"):
            whole = type(self)(self.config, TPGroup(0, self.group.size), self.dtype)
        return {source for s in whole.shard_specs().values() for source in s.sources()}

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        cache_pos: int,
    ) -> torch.Tensor:
        """Logits for the last position of each sequence, [batch, vocab], on every rank. Each pipeline stage
        runs its layers on what the previous stage sent it (the first embeds `ids`) and sends the result on;
        the last stage's logits go to every rank."""
        group, (batch, steps) = self.group, ids.shape
        device = self.model.layers[self.model.held[0]].input_layernorm.weight.device
        if group.first_stage:
            x = self.model.embed_tokens(ids)
        else:
            x = group.receive_from_previous_stage(
                torch.empty(batch, steps, self.config.hidden_size, dtype=self.dtype, device=device))
        step = Step(self.model.rotary(positions, x.dtype), mask, cache_pos)
        for n in self.model.held:
            x = self.model.layers[n](x, step, (cache.keys[n], cache.values[n]))
        if group.pp_size == 1:
            return self.lm_head(self.model.norm(x[:, -1]))
        logits = None
        if group.last_stage:
            logits = self.lm_head(self.model.norm(x[:, -1]))
        else:
            group.send_to_next_stage(x)
        return group.from_last_stage(
            logits, torch.empty(batch, self.config.vocab_size, dtype=self.dtype, device=device))
