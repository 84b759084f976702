"""`shardstate bench --quantized`: the real demo model (SmolLM2-135M-Instruct) converted to bf16, int8 and
fp8 sharded states at one TP size; each loaded by the sharded loader (warm page cache): bytes per rank,
load seconds, peak RSS, and the share of greedy tokens equal to the bf16 run over a few prompts. Writes
quantized.json and quantized.md."""

from __future__ import annotations

from pathlib import Path

from shardstate.benchmark import say, write_rows
from shardstate.convert import convert
from shardstate.runtime.llm import LLM
from shardstate.smollm2 import ensure_smollm2

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The largest planet in the solar system is",
           "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16
METHODS = (None, "int8", "fp8")  # None: the bf16 state


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions whose greedy token equals the reference run's."""
    pairs = [(a, b) for seq, ref in zip(tokens, reference, strict=True) for a, b in zip(seq, ref, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def run_quantized(out_dir: Path, cache_root: Path, tp: int = 3, states_root: Path | None = None) -> list[dict]:
    """The model comes from `cache_root` (converted once); the states are written under `states_root`
    (default: `cache_root`)."""
    source = ensure_smollm2(cache_root, say)
    rows, reference = [], None
    for method in METHODS:
        state = (states_root or cache_root) / f"{source.name}-tp{tp}-{method or 'bf16'}"
        convert(source, state, tp, force=True, show_progress=False, quantize=method)
        with LLM(state, tensor_parallel_size=tp) as llm:
            outputs = llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            reports = llm.load_reports
        tokens = [o.token_ids for o in outputs]
        reference = reference or tokens
        row = {"method": method or "bf16", "tp": tp, "seconds": max(r.seconds for r in reports),
               "bytes_per_rank": [r.bytes_read + r.bytes_mapped for r in reports],
               "peak_rss": [r.peak_rss for r in reports], "token_agreement": agreement(tokens, reference),
               "texts": [o.text for o in outputs]}
        rows.append(row)
        say(f"{row['method']} TP={tp}: {row['seconds']:.3f}s, {max(row['bytes_per_rank']) / 1e6:.1f} MB per rank, "
            f"{row['token_agreement']:.0%} of greedy tokens equal to bf16; {PROMPTS[0]!r} ->{row['texts'][0]!r}")
    return write_rows(out_dir, "quantized", rows, quantized_table(rows))


def quantized_table(rows: list[dict]) -> str:
    lines = [f"SmolLM2-135M-Instruct, sharded states at TP={rows[0]['tp']}, warm page cache; {len(PROMPTS)} prompts x "
             f"{NEW_TOKENS} greedy tokens.", "",
             "| state | MB per rank | load seconds | peak RSS per rank (MB) | tokens equal to bf16 | "
             f"{PROMPTS[0]!r} -> |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {max(r['bytes_per_rank']) / 1e6:.1f} | {r['seconds']:.3f} | "
                     f"{max(r['peak_rss']) / 1e6:.0f} | {r['token_agreement']:.0%} | {r['texts'][0]!r} |")
    return "\n".join(lines) + "\n"
