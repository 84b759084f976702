"""`shardstate demo`: the main job on an embedded default model.

Creates (once, under the cache directory) a random-weight bf16 Llama of ~270 MB and a small tokenizer,
converts it once to a TP=2 sharded state, then loads it at TP=2 with every loader, generates from one
prompt, checks that the tokens are identical and prints what each rank read."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from shardstate.convert import convert
from shardstate.display import load_table
from shardstate.errors import ShardstateError
from shardstate.format.manifest import MANIFEST_NAME
from shardstate.runtime.llm import LLM

DEMO_NAME = "demo-llama-v1"
DEMO_TP = 2
DEMO_PROMPT = "The quick brown fox"
DEMO_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def cache_dir() -> Path:
    root = os.environ.get("SHARDSTATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shardstate"
    )
    return Path(root)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_demo_model() -> Path:
    """The demo checkpoint, created on first use into a temporary sibling and renamed into place."""
    target = cache_dir() / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    try:
        from shardstate.synthetic import make_llama_checkpoint, train_tokenizer
    except ImportError:
        raise ShardstateError(
            "the demo model is made with transformers and tokenizers, which are not installed", None,
            "pip install 'shardstate[hf]'",
        ) from None
    say(f"creating the demo model once in {target} (random weights, bf16, seed 0) ...")
    start = time.perf_counter()
    partial = target.with_name(f".{DEMO_NAME}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    vocab_size = train_tokenizer(partial, vocab_size=2048)
    make_llama_checkpoint(
        partial, seed=0, dtype=torch.bfloat16, initializer_range=0.05, vocab_size=vocab_size, **DEMO_CONFIG
    )
    partial.rename(target)
    size = sum(f.stat().st_size for f in target.iterdir())
    say(f"  done in {time.perf_counter() - start:.1f}s: {size / 1e6:.0f} MB")
    return target


def ensure_sharded(model_dir: Path) -> Path:
    """The demo model converted to a TP=2 sharded state (once)."""
    # "-ids": states with state ids and rank-file records; an older shardstate's state (which --force may
    # not replace: its manifest does not list the side files it copied) is left where it is
    target = model_dir.with_name(f"{model_dir.name}-tp{DEMO_TP}-ids")
    if not (target / MANIFEST_NAME).is_file():
        say(f"converting it to a TP={DEMO_TP} sharded state in {target} ...")
        report = convert(model_dir, target, DEMO_TP, force=True)
        rate = (report.bytes_read + report.bytes_written) / report.seconds / 1e9
        say(f"  done in {report.seconds:.1f}s ({rate:.2f} GB/s read+write), {len(report.files)} files")
    return target


def run_demo(max_new_tokens: int = 16) -> None:
    model_dir = ensure_demo_model()
    sources = {"default": model_dir, "sliced": model_dir, "sharded": ensure_sharded(model_dir)}
    results = {}
    for step, (load_format, source) in enumerate(sources.items(), start=1):
        say(f"[{step}/{len(sources)}] TP={DEMO_TP}, load format '{load_format}': starting workers, loading ...")
        start = time.perf_counter()
        with LLM(source, tensor_parallel_size=DEMO_TP, load_format=load_format) as llm:
            (output,) = llm.generate([DEMO_PROMPT], max_new_tokens=max_new_tokens, ignore_eos=True)
            results[load_format] = (output, llm.load_reports)
        say(f"  done in {time.perf_counter() - start:.1f}s")
    print(f"model:  {model_dir}")
    print(f"prompt: {DEMO_PROMPT!r}")
    for load_format, (output, _) in results.items():
        print(f"{load_format:<9} tokens {output.token_ids}  text {output.text!r}")
    print()
    print(load_table([(name, r) for name, (_, reports) in results.items() for r in reports]))
    token_lists = {tuple(output.token_ids) for output, _ in results.values()}
    if len(token_lists) != 1:
        raise ShardstateError("the load formats gave different tokens", model_dir, "report this as a bug")
    print(f"\nidentical tokens from {', '.join(results)}: yes")
