"""`shardstate bench --warm-path` (and `make bench`): where a sharded read's time goes, warm and cold.

The sharded read of the benchmark model's state at each TP size, every rank in its own worker, with the
rank's load memory reserved and faulted in while the worker starts (io/arena.py; the default), without
that, and with huge pages (SHARDSTATE_PREFAULT, SHARDSTATE_HUGEPAGES); against the read limit (`readinto` into
memory faulted in beforehand, untimed) and vLLM's `sharded_state` on the same files ("Loading weights
took": vLLM allocates its parameters while it builds the model, before that clock). For shardstate both
the load time (from the ranks' barrier) and the time from `LLM(...)` to a loaded model (process start,
imports, group, model, load) are given. Cold, also `--io direct` and the disk's own rate (O_DIRECT, several
reads in flight), which bounds what any loader of these bytes can reach. The variants and one vLLM start
run interleaved, ROUNDS times each (medians).
Writes warm-path.json and warm-path.md."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from shardstate.benchmark import (
    ensure_model,
    environment,
    rank_files,
    say,
    warm_or_cold,
    weight_files,
    write_rows,
)
from shardstate.benchmark.peers import vllm_load
from shardstate.benchmark.ranks import DISK_THREADS, run_ranks
from shardstate.convert import convert
from shardstate.runtime.llm import LLM

ROUNDS = 3
SHARDED = "sharded read"
DIRECT = "sharded read, --io direct"
VARIANTS = {  # name -> (environment of the load, --io)
    SHARDED: ({"SHARDSTATE_PREFAULT": "1", "SHARDSTATE_HUGEPAGES": "0"}, "read"),
    "sharded read, huge pages": ({"SHARDSTATE_PREFAULT": "1", "SHARDSTATE_HUGEPAGES": "1"}, "read"),
    "sharded read, no prefault": ({"SHARDSTATE_PREFAULT": "0", "SHARDSTATE_HUGEPAGES": "0"}, "read"),
    DIRECT: ({"SHARDSTATE_PREFAULT": "1", "SHARDSTATE_HUGEPAGES": "0"}, "direct"),
}
COLD_ONLY = {DIRECT}  # O_DIRECT reads the disk even where the page cache holds the bytes
LIMIT = "limit (readinto, pre-faulted)"
DISK = f"disk limit (O_DIRECT, {DISK_THREADS} reads in flight per rank)"
VLLM = "vLLM sharded_state"


def timed_load(state: Path, tp: int, env: dict[str, str], io: str = "read") -> dict:
    with environment(env):  # the spawned workers inherit it
        start = time.perf_counter()
        with LLM(state, tensor_parallel_size=tp, io=io) as llm:
            started = time.perf_counter() - start
            reports = llm.load_reports
    return {"seconds": max(r.seconds for r in reports), "start_seconds": started,
            "bytes_prefaulted": sum(r.bytes_prefaulted for r in reports)}


def run_warm_path(out_dir: Path, cache_root: Path, tp_sizes: tuple[int, ...], vllm_python: Path | None,
                  smoke: bool = False) -> list[dict]:
    model_dir = ensure_model(cache_root, smoke)
    rounds = 1 if smoke else ROUNDS
    rows: list[dict] = []
    for tp in tp_sizes:
        state = cache_root / f"{model_dir.name}-tp{tp}-ids"  # the main benchmark's states ("-ids")
        if not (state / "shardstate.json").is_file():
            convert(model_dir, state, tp, force=True, show_progress=False)
        files = weight_files(state)
        for cache in ("warm",) if smoke else ("warm", "cold"):
            variants = {name: v for name, v in VARIANTS.items() if cache == "cold" or name not in COLD_ONLY}
            limits = {LIMIT: "limit_read", **({DISK: "disk_limit"} if cache == "cold" else {})}
            measured: dict[str, list[dict]] = {name: [] for name in [*variants, *limits]}
            vllm: list[dict] = []
            for _ in range(rounds):  # vLLM in every round too: this VM's speed drifts over minutes
                for name, (env, io) in variants.items():
                    warm_or_cold(files, cache)
                    measured[name].append(timed_load(state, tp, env, io))
                for name, function in limits.items():
                    warm_or_cold(files, cache)
                    limit = run_ranks(function, rank_files(state))
                    measured[name].append({"seconds": max(r["seconds"] for r in limit)})
                if not smoke and vllm_python is not None and all("seconds" in start for start in vllm):
                    warm_or_cold(files, cache)
                    vllm.append(vllm_load(vllm_python, state, tp, "sharded_state", "bfloat16"))
            for name, runs in measured.items():
                rows.append({"tp": tp, "cache": cache, "name": name, **_medians(runs), "each": runs})
                say(f"[{cache} TP={tp}] {name}: {rows[-1]['seconds']:.3f}s")
            rows.append({"tp": tp, "cache": cache, "name": VLLM, **_vllm(vllm, vllm_python, smoke)})
            say(f"[{cache} TP={tp}] {VLLM}: " + (f"{rows[-1]['seconds']:.2f}s" if "seconds" in rows[-1]
                                                   else rows[-1]["error"]))
    table = markdown(rows, sum(f.stat().st_size for f in weight_files(model_dir)), rounds)
    return write_rows(out_dir, "warm-path", rows, table)


def _medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _vllm(starts: list[dict], python: Path | None, smoke: bool) -> dict:
    if smoke:
        return {"error": "not run (--smoke)"}
    if python is None:
        return {"error": "not run: no vLLM (make test-vllm sets up .venv-vllm)"}
    failed = [start for start in starts if "seconds" not in start]
    if failed:
        return failed[0]
    each = [start["seconds"] for start in starts]
    return {"seconds": statistics.median(each), "seconds_each": each}


def _row(rows: list[dict], tp: int, cache: str, name: str) -> dict | None:
    return next((r for r in rows if (r["tp"], r["cache"], r["name"]) == (tp, cache, name)), None)


def markdown(rows: list[dict], model_bytes: int, rounds: int) -> str:
    tps = sorted({r["tp"] for r in rows})
    caches = sorted({r["cache"] for r in rows}, reverse=True)  # warm, cold
    out = [f"Sharded read of the {model_bytes / 1e9:.2f} GB benchmark model's state, median of {rounds} interleaved "
           "rounds (vLLM: one start per round). Cell: slowest rank's load seconds (from `LLM(...)` to a loaded "
           "model in brackets).", ""]
    for cache in caches:
        out += [f"**{cache} page cache**", "", "| | " + " | ".join(f"TP={tp}" for tp in tps) + " |",
                "|---|" + "---|" * len(tps)]
        for name in [*VARIANTS, LIMIT, DISK, VLLM]:
            found = [_row(rows, tp, cache, name) for tp in tps]
            if not any(found):
                continue
            cells = []
            for row in found:
                if row is None or "seconds" not in row:
                    cells.append((row or {}).get("error", ""))
                    continue
                start = f" ({row['start_seconds']:.2f})" if "start_seconds" in row else ""
                cells.append(f"{row['seconds']:.3f}s{start}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Goals, as ratios from the same run:", ""]
    for tp in tps:
        warm, limit = _row(rows, tp, "warm", SHARDED), _row(rows, tp, "warm", LIMIT)
        out.append(f"- TP={tp}: sharded read / limit, warm (limit seconds / load seconds; target >= 0.85): "
                   f"{limit['seconds'] / warm['seconds']:.2f}")
        for cache in caches:
            vllm = _row(rows, tp, cache, VLLM)
            if "seconds" not in vllm:
                continue
            for name in (SHARDED, DIRECT):
                ours = _row(rows, tp, cache, name)
                if ours is not None:
                    out.append(f"- TP={tp}: {name} vs vLLM sharded_state, {cache} (speed-up; target >= 1.5): "
                               f"{vllm['seconds'] / ours['seconds']:.2f}")
            disk = _row(rows, tp, cache, DISK)
            if disk is not None:  # cold: what reading these bytes from this disk allows at all
                out.append(f"- TP={tp}: the most any loader can gain over vLLM sharded_state cold here (vLLM "
                           f"seconds / disk-limit seconds): {vllm['seconds'] / disk['seconds']:.2f}")
        for cache in caches:
            on, off = _row(rows, tp, cache, SHARDED), _row(rows, tp, cache, "sharded read, no prefault")
            out.append(f"- TP={tp}, {cache}: reserving the load memory at start saves "
                       f"{off['seconds'] - on['seconds']:+.3f}s of load and "
                       f"{off['start_seconds'] - on['start_seconds']:+.3f}s of start-to-loaded (no target)")
    return "\n".join(out) + "\n"
