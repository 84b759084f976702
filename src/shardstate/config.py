"""The part of a Hugging Face config.json that a Llama-family TP model needs, validated."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.dtypes import DTYPE_ALIASES
from shardstate.errors import ShardstateError
from shardstate.io.files import read_regular

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
VOCAB_PADDING = 64  # vLLM pads the vocabulary to a multiple of 64 before splitting it across ranks



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
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    dtype: torch.dtype | None  # what config.json declares, if anything
    eos_token_ids: tuple[int, ...]
    fingerprint: str  # sha256 of config.json's bytes

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PADDING) * VOCAB_PADDING

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

    architectures = cfg.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ShardstateError(
            f"unsupported architecture {architecture!r}", path,
            f"shardstate supports {', '.join(SUPPORTED_ARCHITECTURES)}",
        )

    def need(key: str) -> int:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ShardstateError(f"'{key}' is missing or not a positive integer", path, "repair config.json")
        return value

    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ShardstateError(f"'{flag}': true is not supported yet", path, "use a model without biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ShardstateError(f"hidden_act {cfg['hidden_act']!r} is not supported", path, "use a silu model")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if rope_type != "default":
        raise ShardstateError(f"RoPE scaling {rope_type!r} is not supported yet", path, "use default RoPE")
    rope_theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or cfg.get("rope_theta", 10000.0)

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or heads % kv_heads:
        raise ShardstateError(
            f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}", path,
            "repair config.json",
        )
    head_dim = cfg.get("head_dim") or hidden // heads
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        path=path,
        architecture=architecture,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=DTYPE_ALIASES.get(dtype_name) if isinstance(dtype_name, str) else None,
        eos_token_ids=eos_ids,
        fingerprint=hashlib.sha256(raw).hexdigest(),
    )
