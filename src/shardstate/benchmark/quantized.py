"""Quantized states against the bf16 state, in two tables (`shardstate bench --quantized` writes both, `make
bench` the second):
- quantized.{json,md}: the real demo model (SmolLM2-135M-Instruct) as bf16, int8 and fp8 sharded states at one
  TP size, loaded by the sharded loader (warm page cache): bytes per rank, load seconds, peak RSS, and the
  share of greedy tokens equal to the bf16 run over a few prompts;
- quantized-loads.{json,md}: the 2.4 GB benchmark model's bf16, int8 and fp8 states, warm and cold page
  cache: bytes per rank, the slowest rank's load seconds against the bf16 state's, peak RSS per rank."""

from __future__ import annotations

import time
from pathlib import Path

from shardstate.benchmark import ensure_model, say, shardstate_run, warm_or_cold, weight_files, write_rows
from shardstate.convert import convert
from shardstate.demo import DEMO_TP
from shardstate.runtime.llm import LLM
from shardstate.smollm2 import ensure_smollm2

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The largest planet in the solar system is",
           "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16
METHODS = (None, "int8", "fp8")  # None: the bf16 state
LOAD_REPEATS = 3  # loads per state and cache (the table shows the median: single loads swing here)


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions whose greedy token equals the reference run's."""
    pairs = [(a, b) for seq, ref in zip(tokens, reference, strict=True) for a, b in zip(seq, ref, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def run_quantized(out_dir: Path, cache_root: Path, tp: int = DEMO_TP, states_root: Path | None = None) -> list[dict]:
    """The model comes from `cache_root` (converted once); the states are written under `states_root`
    (default: `cache_root`)."""
    source = ensure_smollm2(cache_root, say)
    rows, reference = [], None
    for method in METHODS:
        state = (states_root or cache_root) / f"{source.name}-tp{tp}-{method or 'bf16'}"
        convert(source, state, tp, force=True, show_progress=False, quantize=method)
        with LLM(state, tensor_parallel_size=tp) as llm:
            start = time.perf_counter()
            outputs = llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            generate_seconds = time.perf_counter() - start
            reports = llm.load_reports
        tokens = [o.token_ids for o in outputs]
        reference = reference or tokens
        row = {"method": method or "bf16", "tp": tp, "seconds": max(r.seconds for r in reports),
               "bytes_per_rank": [r.bytes_read + r.bytes_mapped for r in reports],
               "peak_rss": [r.peak_rss for r in reports], "generate_seconds": generate_seconds,
               "token_agreement": agreement(tokens, reference),
               "texts": [o.text for o in outputs]}
        rows.append(row)
        say(f"{row['method']} TP={tp}: {row['seconds']:.3f}s, {max(row['bytes_per_rank']) / 1e6:.1f} MB per rank, "
            f"{row['token_agreement']:.0%} of greedy tokens equal to bf16; {PROMPTS[0]!r} ->{row['texts'][0]!r}")
    return write_rows(out_dir, "quantized", rows, quantized_table(rows))


def quantized_table(rows: list[dict]) -> str:
    lines = [f"SmolLM2-135M-Instruct, sharded states at TP={rows[0]['tp']}, warm page cache; {len(PROMPTS)} prompts x "
             f"{NEW_TOKENS} greedy tokens.", "",
             "| state | MB per rank | load seconds | generate seconds | peak RSS per rank (MB) | "
             f"tokens equal to bf16 | {PROMPTS[0]!r} -> |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {max(r['bytes_per_rank']) / 1e6:.1f} | {r['seconds']:.3f} | "
                     f"{r['generate_seconds']:.2f} | {max(r['peak_rss']) / 1e6:.0f} | {r['token_agreement']:.0%} | "
                     f"{r['texts'][0]!r} |")
    return "\n".join(lines) + "\n"


def run_quantized_loads(out_dir: Path, cache_root: Path, tp: int, smoke: bool = False) -> list[dict]:
    """The benchmark model (made once under `cache_root`) as a bf16, int8 and fp8 state at `tp`, each loaded
    by the sharded loader (`--io read`) with a warm and a cold page cache."""
    model_dir = ensure_model(cache_root, smoke)
    repeats = 1 if smoke else LOAD_REPEATS  # smoke: the harness's correctness, not a median
    rows = []
    for method in METHODS:
        state = cache_root / f"{model_dir.name}-tp{tp}-{method or 'bf16'}"
        convert(model_dir, state, tp, force=True, show_progress=False, quantize=method)
        for cache in ("warm", "cold"):
            runs = []
            for _ in range(repeats):
                warm_or_cold(weight_files(state), cache)
                runs.append(shardstate_run(state, tp, "sharded", "read", None))
            run = sorted(runs, key=lambda r: r["seconds"])[repeats // 2]
            rows.append({"method": method or "bf16", "tp": tp, "cache": cache, "seconds": run["seconds"],
                         "seconds_each": [r["seconds"] for r in runs],
                         "bytes_per_rank": [r["bytes_read"] for r in run["per_rank"]],
                         "peak_rss": [r["peak_rss"] for r in run["per_rank"]]})
            say(f"[{cache} TP={tp}] {rows[-1]['method']} state: {run['seconds']:.3f}s, "
                f"{max(rows[-1]['bytes_per_rank']) / 1e6:.0f} MB per rank")
    return write_rows(out_dir, "quantized-loads", rows, quantized_loads_table(rows, model_dir.name))


def quantized_loads_table(rows: list[dict], model: str) -> str:
    bf16 = {r["cache"]: r for r in rows if r["method"] == "bf16"}
    lines = [f"{model}, sharded loader (--io read) at TP={rows[0]['tp']}; seconds: the slowest rank's load, "
             f"median of {len(rows[0]['seconds_each'])}.", "",
             "| state | cache | MB per rank | load seconds | vs bf16 | peak RSS per rank (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["seconds"] / bf16[r["cache"]]["seconds"]
        lines.append(f"| {r['method']} | {r['cache']} | {max(r['bytes_per_rank']) / 1e6:.0f} | {r['seconds']:.3f} | "
                     f"{ratio:.2f}x | {max(r['peak_rss']) / 1e6:.0f} |")
    return "\n".join(lines) + "\n"
