"""Checkpoints made with transformers (random weights, fixed seeds) and transformers' own greedy decode
as the reference."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from shardstate.synthetic import make_llama_checkpoint

# vocab 203: not a multiple of 64, nor of any TP size used here.
CHECKPOINTS = {
    "gqa_untied": {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    "mha_tied": {
        "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True, "rope_theta": 500000.0
    },
}
PROMPTS = [[1, 5, 9, 33, 7, 120], [4, 100, 2, 8], [150], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: make_llama_checkpoint(root / name, seed=n, **overrides)
        for n, (name, overrides) in enumerate(CHECKPOINTS.items())
    }


@pytest.fixture(scope="session")
def sharded_bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, split over several files with model.safetensors.index.json."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("multi") / "bf16", seed=7, dtype=torch.bfloat16, max_shard_size="40KB",
        num_key_value_heads=2, tie_word_embeddings=False,
    )


def transformers_greedy(model_dir: Path, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Reference: transformers' own model of the checkpoint's family in fp32, full recompute each step (no
    cache). Returns the new tokens per prompt and the logits after each prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, first = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out: list[int] = []
            for step in range(steps):
                logits = model(ids).logits[0, -1]
                if step == 0:
                    first.append(logits)
                out.append(int(logits.argmax()))
                ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
            tokens.append(out)
    return tokens, torch.stack(first)


S3_BUCKET = "shardstate-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (SeaweedFS on 127.0.0.1) for each test module that asks, with S3_BUCKET
    made (modules reuse prefix names); stopped, its data removed, when the module is done."""
    from shardstate.benchmark.seaweedfs import s3_server

    with s3_server(tmp_path_factory.mktemp("seaweedfs")) as running:
        running.client().create_bucket(Bucket=S3_BUCKET)
        yield running


def checkpoint_maker(tmp_path_factory: pytest.TempPathFactory, families: dict[str, tuple[str, dict]], seed: int):
    """`make(name)`: the checkpoint of `families[name]` = (architecture, config overrides), made once with
    weights of std 0.1 (so greedy tokens vary)."""
    from shardstate.synthetic import make_checkpoint

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            architecture, overrides = families[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name) / "hf", architecture, seed=seed,
                                         initializer_range=0.1, **overrides)
        return made[name]

    return make


@pytest.fixture(autouse=True)
def ctrl_c_left_as_it_was():
    """Every test leaves Ctrl-C as it found it: a library path that left SIGINT ignored would take a user's
    Ctrl-C away after it returned (and a later test's here)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"SIGINT's handler was left {after!r} (was {before!r})")
