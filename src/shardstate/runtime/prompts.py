"""Prompts in (text or ids, checked against the vocabulary), outputs out (ids, text, first logits)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.config import ModelConfig
from shardstate.errors import ShardstateError
from shardstate.models import OpenedModel, check_generation_fits, open_model
from shardstate.runtime.generate import Generation, TopLogprobs
from shardstate.tokenizer import Tokenizer


@dataclass
class Output:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated
    text: str | None  # decoded generated text when the model has a tokenizer.json
    logits: torch.Tensor  # fp32 [vocab]: next-token logits after the prompt
    logprobs: list[TopLogprobs] | None = None  # generate(logprobs=k): per new token, its step's top k

    def to_json(self) -> dict:
        doc: dict = {"token_ids": self.token_ids, "text": self.text}
        if self.logprobs is not None:
            doc["logprobs"] = [[[token, value] for token, value in step] for step in self.logprobs]
        return doc


class PromptCodec:
    def __init__(self, model_dir: Path, config: ModelConfig):
        self.model_dir = model_dir
        self.config = config
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model_dir)
        return self._tokenizer

    def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        encoded = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise ShardstateError(f"prompt {prompt!r} has no tokens", None, "give a non-empty prompt")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ShardstateError(
                    f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})",
                    self.config.path, "pass ids the model knows",
                )
            encoded.append(ids)
        return encoded

    def outputs(self, prompt_ids: list[list[int]], generation: Generation) -> list[Output]:
        has_text = (self.model_dir / "tokenizer.json").is_file()
        return [
            Output(ids, new, self.tokenizer.decode(new) if has_text else None, generation.first_logits[row],
                   None if generation.logprobs is None else generation.logprobs[row])
            for row, (ids, new) in enumerate(zip(prompt_ids, generation.token_ids, strict=True))
        ]


@dataclass(frozen=True)
class PreparedPrompts:
    model: OpenedModel  # MODEL opened once, for the load that follows
    codec: PromptCodec
    ids: list[list[int]]


def prepare_prompts(
    model_dir: str | Path, dtype_name: str | None, prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
    tp_size: int, ranks_here: int, cache_dir: str | os.PathLike[str] | None = None,
) -> PreparedPrompts:
    """Before anything is loaded: config.json read and the TP size checked, the prompts encoded, and the
    generation checked to fit the model's positions and (CPU) this host's memory. (An s3:// model's small
    files are fetched into the node cache under `cache_dir` here.)"""
    model = open_model(model_dir, dtype_name, cache_dir)
    model.config.check_tp_size(tp_size)
    codec = PromptCodec(model.directory.path, model.config)
    ids = codec.encode(prompts)
    check_generation_fits(model.config, ids, max_new_tokens, tp_size, model.dtype, ranks_here)
    return PreparedPrompts(model, codec, ids)
