"""Random-weight Hugging Face checkpoints of every family, made with transformers from a seed (tests,
bench). Needs the `hf` extra (transformers, tokenizers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TOKENIZER_CORPUS = """\
Tensor parallel workers each hold a slice of every large weight matrix. Loading a model the usual way
makes every worker read the whole checkpoint and keep only its part, which multiplies the reads by the
number of workers. A sharded state stores each worker's part in its own files, so every worker reads only
what it holds. The quick brown fox jumps over the lazy dog. Once upon a time there was a small model
that learned to count: one, two, three, four, five, six, seven, eight, nine, ten.
"""


MODEL_TYPES = {  # HF architecture -> transformers model_type
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe", "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",  # not a shardstate family: for the vLLM plugin's opaque cache entries
}


def make_checkpoint(
    out_dir: str | Path,
    architecture: str = "LlamaForCausalLM",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    initializer_range: float = 0.2,
    max_shard_size: str | int | None = None,
    **config: Any,
) -> Path:
    """Save a model of `architecture` with random weights (normal(0, initializer_range), fixed seed) to
    `out_dir`, as transformers' save_pretrained writes it. `config` overrides the config's fields;
    `max_shard_size` splits the weights into several files with an index, as the hub's big checkpoints are."""
    from transformers import AutoConfig, AutoModelForCausalLM

    defaults: dict[str, Any] = {
        "vocab_size": 203,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
    }
    cfg = AutoConfig.for_model(MODEL_TYPES[architecture], **{**defaults, **config},
                               initializer_range=initializer_range)
    cfg.architectures = [architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms start at 1.0 and biases, routers at 0: random ones catch one loaded wrongly
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(("bias", "gate.weight", "shared_expert_gate.weight")):
                param.copy_(initializer_range * torch.randn_like(param))
    model = model.to(dtype)
    out = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return out


def make_llama_checkpoint(out_dir: str | Path, **kwargs: Any) -> Path:
    return make_checkpoint(out_dir, "LlamaForCausalLM", **kwargs)


def train_tokenizer(out_dir: str | Path, vocab_size: int, corpus: str = TOKENIZER_CORPUS) -> int:
    """Write a byte-level BPE tokenizer.json trained on `corpus`; return its real vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([corpus], trainer)
    tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    return tokenizer.get_vocab_size()
