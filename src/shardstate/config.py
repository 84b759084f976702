"""The part of a Hugging Face config.json that a Llama-family TP model needs, validated."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.dtypes import DTYPE_ALIASES
from shardstate.errors import ShardstateError, brief
from shardstate.io.files import read_regular

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
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
DEFAULT_MAX_POSITIONS = 2048  # transformers' LlamaConfig default when config.json has none


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
    rope_theta: float
    tie_word_embeddings: bool
    dtype: torch.dtype | None  # what config.json declares, if anything
    eos_token_ids: tuple[int, ...]
    fingerprint: str  # sha256 of config.json's bytes

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
        if self.intermediate_size % tp_size:
            raise refuse("intermediate_size", self.intermediate_size)
        if self.padded_vocab_size % tp_size:
            raise refuse("the padded vocab size", self.padded_vocab_size)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read MODEL/config.json; refuse what the Llama TP model cannot run, with the reason."""
    if not Path(model_dir).is_dir():
        raise ShardstateError("not a directory", Path(model_dir), "pass a Hugging Face model directory")
    path = Path(model_dir) / "config.json"
    try:
        raw = read_regular(path)
    except FileNotFoundError:
        raise ShardstateError("config.json not found", Path(model_dir), "pass a Hugging Face model directory") from None
    except OSError as exc:
        raise ShardstateError(f"cannot read config.json ({exc.strerror})", path, "check permissions") from None
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise ShardstateError(f"config.json is not valid JSON ({exc})", path, "repair the file") from None
    if not isinstance(cfg, dict):
        raise ShardstateError("config.json is not a JSON object", path, "repair the file")

    architectures = cfg.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ShardstateError(
            f"unsupported architecture {brief(architecture)}", path,
            f"shardstate supports {', '.join(SUPPORTED_ARCHITECTURES)}",
        )

    def need(key: str, most: int, default: int | None = None) -> int:
        """config[key] (`default` when absent or null): an integer from 1 to `most`."""
        value = cfg.get(key)
        if value is None:
            if default is None:
                raise ShardstateError(f"'{key}' is missing", path, "repair config.json")
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ShardstateError(f"'{key}' is {brief(value)}, not a positive integer", path, "repair config.json")
        if value > most:
            raise ShardstateError(f"'{key}' is {brief(value)}, above shardstate's limit of {most}", path,
                                  "repair config.json")
        return value

    def positive_number(key: str, value: object) -> float:
        """A finite positive JSON number: not a bool, not a string, not NaN or Infinity."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= sys.float_info.max:
            raise ShardstateError(f"'{key}' is {brief(value)}, not a finite positive number", path,
                                  "repair config.json")
        return float(value)

    for flag in ("attention_bias", "mlp_bias"):
        value = cfg.get(flag, False)
        if not isinstance(value, bool):
            raise ShardstateError(f"'{flag}' is {brief(value)}, not true or false", path, "repair config.json")
        if value:
            raise ShardstateError(f"'{flag}': true is not supported yet", path, "use a model without biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ShardstateError(f"hidden_act {brief(cfg['hidden_act'])} is not supported", path, "use a silu model")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if rope_type != "default":
        raise ShardstateError(f"RoPE scaling {brief(rope_type)} is not supported yet", path, "use default RoPE")
    rope_theta = rope["rope_theta"] if "rope_theta" in rope else cfg.get("rope_theta", 10000.0)

    heads = need("num_attention_heads", MAX_HEADS)
    hidden = need("hidden_size", MAX_HIDDEN_SIZE)
    kv_heads = need("num_key_value_heads", MAX_HEADS, default=heads)
    if heads % kv_heads:
        raise ShardstateError(
            f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}", path,
            "repair config.json",
        )
    head_dim = need("head_dim", MAX_HEAD_DIM, default=hidden // heads)
    if head_dim % 2:
        raise ShardstateError(f"'head_dim' is {head_dim}, not even (RoPE rotates pairs of dimensions)", path,
                              "repair config.json")
    vocab = need("vocab_size", MAX_VOCAB_SIZE)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in eos_ids):
        raise ShardstateError(f"'eos_token_id' is {brief(eos)}, not a token id or a list of them in [0, {vocab})",
                              path, "repair config.json")
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ShardstateError(f"'tie_word_embeddings' is {brief(tie)}, not true or false", path, "repair config.json")
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
    return ModelConfig(
        path=path,
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=need("intermediate_size", MAX_INTERMEDIATE_SIZE),
        num_hidden_layers=need("num_hidden_layers", MAX_LAYERS),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=need("max_position_embeddings", MAX_POSITIONS, default=DEFAULT_MAX_POSITIONS),
        rms_norm_eps=positive_number("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=positive_number("rope_theta", rope_theta),
        tie_word_embeddings=tie,
        dtype=DTYPE_ALIASES.get(dtype_name) if isinstance(dtype_name, str) else None,
        eos_token_ids=eos_ids,
        fingerprint=hashlib.sha256(raw).hexdigest(),
    )
