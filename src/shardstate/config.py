"""The part of a Hugging Face config.json that a decoder family's TP model needs, validated. Each family
(models/<family>.py) reads its config with a ConfigReader; models.load_config picks the family. (Reading
the file itself is format/config_json.py's.)"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import ShardstateError, brief
from shardstate.format.dtypes import DTYPE_ALIASES

VOCAB_PADDING = 64  # vLLM pads the vocabulary to a multiple of 64 before splitting it across ranks

# Upper bounds on config.json's sizes, checked before any layer is built. Released models sit far below
# them (Llama-3.1 405B: 126 layers, hidden 16384, intermediate 53248, 128 heads, 131072 positions;
# Qwen2.5: vocab 152064; DeepSeek-V3: vocab 129280, 163840 positions; Mixtral: head_dim 128; Llama-4
# Scout: 10M positions); a typo or a hostile file above them is refused instead of hanging or exhausting
# memory while the model is built.
MAX_LAYERS = 4096
MAX_HIDDEN_SIZE = 1 << 17
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_VOCAB_SIZE = 1 << 24
MAX_HEADS = 4096  # attention and key/value heads
MAX_HEAD_DIM = 4096
MAX_POSITIONS = 1 << 24
MAX_EXPERTS = 4096
DEFAULT_MAX_POSITIONS = 2048  # transformers' LlamaConfig default when config.json has none


@dataclass(frozen=True)
class Rope:
    """Rotary embedding: base frequency and the scaling config.json asks for (transformers' rope types)."""

    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 0


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP: `experts` experts of `intermediate_size`, `top_k` per token."""

    experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    dense_layers: frozenset[int] = frozenset()  # layers with a plain MLP instead


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: Rope
    tie_word_embeddings: bool
    dtype: torch.dtype | None  # what config.json declares, if anything
    eos_token_ids: tuple[int, ...]
    fingerprint: str  # sha256 of config.json's bytes
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm of each head's q and k before RoPE
    sliding_window: int | None = None  # attend to keys within the last this many positions
    moe: MoE | None = None

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PADDING) * VOCAB_PADDING

    def kv_cache_bytes(self, tp_size: int, batch: int, positions: int, dtype: torch.dtype) -> int:
        """What one rank's KV cache takes (models.llama.KVCache.allocate): keys and values for every layer,
        [batch, local kv heads, positions, head_dim] each; kv heads are replicated when tp_size exceeds them."""
        local_kv_heads = self.num_key_value_heads // min(tp_size, self.num_key_value_heads)
        return 2 * self.num_hidden_layers * batch * local_kv_heads * positions * self.head_dim * dtype.itemsize

    def check_tp_size(self, tp_size: int) -> None:
        """Refuse a TP size the model cannot be split into (as vLLM does)."""

        def refuse(what: str, value: int) -> ShardstateError:
            return ShardstateError(
                f"TP size {tp_size} does not divide {what}={value}", self.path,
                f"use a --tp that divides {value}",
            )

        if tp_size < 1:
            raise ShardstateError(f"TP size {tp_size} is not positive", None, "use --tp 1 or more")
        if self.num_attention_heads % tp_size:
            raise refuse("num_attention_heads", self.num_attention_heads)
        kv = self.num_key_value_heads
        if (kv % tp_size) if tp_size <= kv else (tp_size % kv):
            raise ShardstateError(
                f"TP size {tp_size} and num_key_value_heads={kv} do not divide one another", self.path,
                f"use a --tp that divides {kv} or a multiple of it that divides {self.num_attention_heads}",
            )
        if (self.moe is None or self.moe.dense_layers) and self.intermediate_size % tp_size:
            raise refuse("intermediate_size", self.intermediate_size)
        if self.moe is not None and self.moe.intermediate_size % tp_size:
            raise refuse("moe_intermediate_size", self.moe.intermediate_size)
        if self.moe is not None and self.moe.shared_intermediate_size % tp_size:
            raise refuse("shared_expert_intermediate_size", self.moe.shared_intermediate_size)
        if self.padded_vocab_size % tp_size:
            raise refuse("the padded vocab size", self.padded_vocab_size)


def architecture_of(cfg: dict) -> str | None:
    architectures = cfg.get("architectures")
    first = architectures[0] if isinstance(architectures, list) and architectures else None
    return first if isinstance(first, str) else None


class ConfigReader:
    """Typed, bounded reads of config.json's keys; each refusal names the key and the file. Families read
    their own keys with it (models/<family>.py) on top of the ones every decoder has (`common`);
    `defaults` are the family's values for absent keys (transformers' config class defaults)."""

    def __init__(self, cfg: dict, raw: bytes, path: Path, defaults: dict | None = None) -> None:
        self.cfg, self.raw, self.path = cfg, raw, path
        self.defaults = defaults or {}

    def refuse(self, problem: str, todo: str = "repair config.json") -> ShardstateError:
        return ShardstateError(problem, self.path, todo)

    def _get(self, key: str, default: object) -> object:
        value = self.cfg.get(key)
        return self.defaults.get(key, default) if value is None else value

    def integer(self, key: str, most: int, default: int | None = None, least: int = 1, bound: str | None = None) -> int:
        """config[key] (the family's default, else `default`, when absent or null): an integer from
        `least` to `most`; `bound` names what `most` is when it is another key's value, not a limit of ours."""
        value = self._get(key, default)
        if value is None:
            raise self.refuse(f"'{key}' is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive integer" if least == 1 else f"an integer of at least {least}"
            raise self.refuse(f"'{key}' is {brief(value)}, not {kind}")
        if value > most:
            limit = f"{bound}={most}" if bound else f"shardstate's limit of {most}"
            raise self.refuse(f"'{key}' is {brief(value)}, above {limit}")
        return value

    def positive(self, key: str, value: object) -> float:
        """A finite positive JSON number: not a bool, not a string, not NaN or Infinity."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= sys.float_info.max:
            raise self.refuse(f"'{key}' is {brief(value)}, not a finite positive number")
        return float(value)

    def number(self, key: str, default: float) -> float:
        return self.positive(key, self._get(key, default))

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.refuse(f"'{key}' is {brief(value)}, not true or false")
        return value

    def unsupported(self, key: str, default: object, what: str) -> None:
        """Refuse a key whose value asks for something this family's model does not implement."""
        value = self.cfg.get(key, default)
        if value != default:
            raise self.refuse(f"'{key}': {brief(json.dumps(value))[1:-1]} is not supported yet",
                              f"use a model without {what}")

    def sliding_window(self) -> int | None:
        """The attention window (keys within the last `sliding_window` positions), or None."""
        if self._get("sliding_window", None) is None:
            return None
        return self.integer("sliding_window", MAX_POSITIONS)

    def rope_dict(self) -> dict:
        """RoPE settings: `rope_parameters` (transformers 5) or `rope_scaling` (earlier); both present and
        disagreeing is refused rather than guessed."""
        found = {}
        for key in ("rope_parameters", "rope_scaling"):
            value = self.cfg.get(key)
            if value is not None and not isinstance(value, dict):
                raise self.refuse(f"'{key}' is {brief(value)}, not an object")
            if value:
                found[key] = {("rope_type" if k == "type" else k): v for k, v in value.items()}
        if len(found) == 2:
            params, scaling = found["rope_parameters"], found["rope_scaling"]
            if any(params.get(k) != v for k, v in scaling.items()):
                raise self.refuse("'rope_parameters' and 'rope_scaling' disagree", "keep one of them")
        return found.get("rope_parameters") or found.get("rope_scaling") or {}

    def rope(self, max_positions: int) -> Rope:
        rope = self.rope_dict()
        kind = rope.get("rope_type", "default")
        theta_value = rope.get("rope_theta")
        theta = self.number("rope_theta", 1e4) if theta_value is None else self.positive("rope_theta", theta_value)

        def required(key: str) -> float:
            if rope.get(key) is None:
                raise self.refuse(f"{kind} RoPE has no '{key}'")
            return self.positive(key, rope[key])

        if kind == "default":
            return Rope(theta)
        if kind == "linear":
            return Rope(theta, "linear", required("factor"))
        if kind == "llama3":
            original = rope.get("original_max_position_embeddings")
            if isinstance(original, bool) or not isinstance(original, int) or not 0 < original <= max_positions:
                raise self.refuse(f"llama3 RoPE's original_max_position_embeddings is {brief(original)}")
            low, high = required("low_freq_factor"), required("high_freq_factor")
            if low >= high:
                raise self.refuse(f"llama3 RoPE's low_freq_factor {low} is not below high_freq_factor {high}")
            return Rope(theta, "llama3", required("factor"), low, high, original)
        raise self.refuse(f"RoPE scaling {brief(kind)} is not supported yet",
                          "use a model with default, linear or llama3 RoPE")

    def common(self, architecture: str) -> dict:
        """The fields every decoder family has, checked (head_dim: hidden_size / num_attention_heads unless
        config.json or the family's defaults say)."""
        for flag in ("attention_bias", "mlp_bias"):
            if self.flag(flag, False):
                raise self.refuse(f"'{flag}': true is not supported yet", "use a model without biases")
        if self.cfg.get("hidden_act", "silu") != "silu":
            raise self.refuse(f"hidden_act {brief(self.cfg['hidden_act'])} is not supported", "use a silu model")
        heads = self.integer("num_attention_heads", MAX_HEADS)
        hidden = self.integer("hidden_size", MAX_HIDDEN_SIZE)
        kv_heads = self.integer("num_key_value_heads", MAX_HEADS, default=heads)
        if heads % kv_heads:
            raise self.refuse(f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
        head_dim = self.integer("head_dim", MAX_HEAD_DIM, default=hidden // heads)
        if head_dim % 2:
            raise self.refuse(f"'head_dim' is {head_dim}, not even (RoPE rotates pairs of dimensions)")
        vocab = self.integer("vocab_size", MAX_VOCAB_SIZE)
        eos = self.cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in eos_ids):
            raise self.refuse(f"'eos_token_id' is {brief(eos)}, not a token id or a list of them in [0, {vocab})")
        max_positions = self.integer("max_position_embeddings", MAX_POSITIONS, default=DEFAULT_MAX_POSITIONS)
        return dict(
            path=self.path,
            architecture=architecture,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=self.integer("intermediate_size", MAX_INTERMEDIATE_SIZE),
            num_hidden_layers=self.integer("num_hidden_layers", MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rms_norm_eps=self.number("rms_norm_eps", 1e-6),
            rope=self.rope(max_positions),
            tie_word_embeddings=self.flag("tie_word_embeddings", False),
            dtype=self.dtype(),
            eos_token_ids=eos_ids,
            fingerprint=hashlib.sha256(self.raw).hexdigest(),
        )

    def dtype(self) -> torch.dtype | None:
        """config.json's `dtype` (`torch_dtype` before transformers 5), or None when it names none; one it
        names that shardstate cannot run is refused, not ignored."""
        for key in ("dtype", "torch_dtype"):
            name = self.cfg.get(key)
            if name is None:
                continue
            if not isinstance(name, str) or name.lower() not in DTYPE_ALIASES:
                raise self.refuse(f"'{key}' is {brief(name)}, not float32, float16 or bfloat16")
            return DTYPE_ALIASES[name.lower()]
        return None

    def moe(self, experts_key: str, intermediate_key: str, shared_key: str | None = None) -> MoE:
        """A mixture-of-experts config; layers listed in mlp_only_layers, or off the decoder_sparse_step
        rhythm, keep a plain MLP (transformers' Qwen MoE rule)."""
        experts = self.integer(experts_key, MAX_EXPERTS)
        top_k = self.integer("num_experts_per_tok", experts, bound=experts_key)
        layers = self.integer("num_hidden_layers", MAX_LAYERS)
        step = self.integer("decoder_sparse_step", layers, default=1, bound="num_hidden_layers")
        only_mlp = self._get("mlp_only_layers", [])
        if not isinstance(only_mlp, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n < layers for n in only_mlp):
            raise self.refuse(f"'mlp_only_layers' is {brief(only_mlp)}, not a list of layer indices")
        dense = frozenset(n for n in range(layers) if n in only_mlp or (n + 1) % step)
        return MoE(experts, top_k, self.integer(intermediate_key, MAX_INTERMEDIATE_SIZE),
                   self.flag("norm_topk_prob", False),
                   self.integer(shared_key, MAX_INTERMEDIATE_SIZE, least=0, default=0) if shared_key else 0, dense)
