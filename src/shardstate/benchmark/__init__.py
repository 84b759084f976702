"""`shardstate bench` / `make bench`: load times of every shardstate path and of peers on the same files,
at several TP sizes, warm and cold page cache, in one run; JSON + markdown + PNG.

Each measurement is the slowest rank's load time (loads start together), so GB/s is the rank bytes
summed over ranks divided by that time. Peak RSS is each rank process's maximum after loading."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from shardstate.benchmark.cache import evict, resident_bytes
from shardstate.benchmark.peers import transformers_tp_load, vllm_load
from shardstate.benchmark.ranks import run_ranks
from shardstate.benchmark.report import write_reports
from shardstate.convert import convert
from shardstate.format.sharded_state import open_sharded_state
from shardstate.runtime.llm import LLM

FULL_MODEL = {  # ~2.4 GB in bf16
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 1024,
}
SMOKE_MODEL = {"vocab_size": 203, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
PROMPT = [1, 2, 3, 4]
VERIFY_ROUNDS = 5
VLLM_REPEATS = 3
SHARDSTATE_RUNS = [  # (name, load format, io mode, io threads (None: the default), on the sharded state?)
    ("default", "default", "read", None, False),
    ("sliced", "sliced", "read", None, False),
    ("scatter", "scatter", "read", None, False),
    ("sharded read", "sharded", "read", None, True),
    ("sharded read 1 thread", "sharded", "read", 1, True),
    ("sharded read + verify", "sharded", "read+verify", None, True),
    ("sharded mmap", "sharded", "mmap", None, True),
    ("sharded direct", "sharded", "direct", None, True),
]


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in this process's environment (spawned workers and peers inherit it) for the block,
    then put back as they were."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_rows(out_dir: Path, stem: str, rows: list[dict], table: str) -> list[dict]:
    """A benchmark's rows as `stem`.json and its markdown table as `stem`.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out_dir / f"{stem}.md").write_text(table)
    return rows


def ensure_model(root: Path, smoke: bool) -> Path:
    from shardstate.synthetic import make_llama_checkpoint

    target = root / ("smoke-llama" if smoke else "bench-llama-2.4gb")
    if not (target / "config.json").is_file():
        say(f"creating {target.name} (transformers, random bf16 weights, seed 0) ...")
        partial = target.with_name(target.name + ".partial")
        try:
            make_llama_checkpoint(partial, seed=0, dtype=torch.bfloat16, initializer_range=0.02,
                                  **(SMOKE_MODEL if smoke else FULL_MODEL))
        except BaseException:  # stopped or failed: the benchmark's own half-made model goes
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(target)
    return target


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def rank_files(sharded: Path) -> list[list[Path]]:
    state = open_sharded_state(sharded)
    return [state.rank_paths(rank) for rank in range(state.tp_size)]


def raw_copy_seconds(source_files: list[Path], out_dir: Path) -> tuple[float, float]:
    """Plain read of the source and plain write of as many bytes (fsynced): the converter's yardstick."""
    start = time.perf_counter()
    total = 0
    for file in source_files:
        with open(file, "rb", buffering=0) as f:
            while block := f.read(16 << 20):
                total += len(block)
    read_s = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "raw-write.bin"
    block = bytes(16 << 20)
    start = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(0, total, len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return read_s, write_s


def warm_or_cold(files: list[Path], cache: str, every_file: list[Path] | None = None) -> int | None:
    """Before a load: "cold" evicts `every_file` (default `files`) from the page cache, "warm" evicts `files`
    and reads them once, so that every warm load finds a cache filled the same way just before it: on this
    VM, pages left in the cache for minutes (and mapped, and refaulted: workingset_refault_file) made vLLM's
    mmap-based load take 12-15 s instead of 1.0 s. Returns how many bytes of `files` are then resident
    (None where that cannot be known)."""
    if cache == "cold":
        evict(every_file or files)
    else:
        evict(files)
        for f in files:
            with open(f, "rb", buffering=0) as handle:
                while handle.read(16 << 20):
                    pass
    return resident_bytes(files)


def summarize(per_rank: list[dict]) -> dict:
    seconds = max(r["seconds"] for r in per_rank)
    total = sum(r["bytes_read"] for r in per_rank)
    return {"seconds": seconds, "bytes_read": total, "gb_per_s": total / seconds / 1e9 if seconds else None,
            "per_rank": per_rank}


def shardstate_run(model_dir: Path, tp: int, load_format: str, io: str, threads: int | None) -> dict:
    io, _, verify = io.partition("+")
    with LLM(model_dir, tensor_parallel_size=tp, load_format=load_format, io=io, io_threads=threads,
             verify=bool(verify)) as llm:
        (output,) = llm.generate([PROMPT], max_new_tokens=2, ignore_eos=True)
        reports = [
            {"rank": r.rank, "seconds": r.seconds, "bytes_read": r.bytes_read + r.bytes_mapped,
             "peak_rss": r.peak_rss} for r in llm.load_reports
        ]
    return {**summarize(reports), "tokens": output.token_ids, "shardstate": True}


def verify_cost(model_dir: Path, tp: int, rounds: int) -> list[dict]:
    """--verify's extra load time, warm cache, from `rounds` alternating loads with and without it per
    I/O mode (medians: one pair of loads is too noisy on a small machine)."""
    costs = []
    for io in ("read", "mmap"):
        plain, checked = [], []
        for _ in range(rounds):
            plain.append(shardstate_run(model_dir, tp, "sharded", io, None)["seconds"])
            checked.append(shardstate_run(model_dir, tp, "sharded", f"{io}+verify", None)["seconds"])
        extra = statistics.median(checked) - statistics.median(plain)
        costs.append({"tp": tp, "io": io, "seconds": plain, "seconds_verify": checked, "extra_seconds": extra,
                      "extra_fraction": extra / statistics.median(plain)})
        say(f"[warm TP={tp}] --verify with --io {io}: {extra:+.3f}s ({costs[-1]['extra_fraction']:+.1%})")
    return costs


def vllm_median(python: Path, source: Path, tp: int, load_format: str,
                prepare: Callable[[list[Path]], int | None]) -> tuple[int | None, dict]:
    """vLLM's load time swings by up to 4x from run to run here: VLLM_REPEATS loads, each after
    `prepare` (warm or cold cache), and their median. Returns (bytes resident before, outcome)."""
    each, resident = [], None
    for _ in range(VLLM_REPEATS):
        resident = prepare(weight_files(source))
        once = vllm_load(python, source, tp, load_format, "bfloat16")
        if "seconds" not in once:
            return resident, once
        each.append(once["seconds"])
    return resident, {"seconds": statistics.median(each), "seconds_each": each}


def run_bench(out_dir: Path, cache_root: Path, smoke: bool = False, tp_sizes: tuple[int, ...] = (1, 2, 4),
              vllm_python: Path | None = None) -> dict:
    model_dir = ensure_model(cache_root, smoke)
    source_files = weight_files(model_dir)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "model": {"path": str(model_dir), "bytes": sum(f.stat().st_size for f in source_files)},
        "convert": [], "runs": [], "verify_cost": [],
    }
    sharded: dict[int, Path] = {}
    for tp in tp_sizes:
        sharded[tp] = cache_root / f"{model_dir.name}-tp{tp}-ids"  # "-ids": see demo.ensure_sharded
        evict(source_files)
        report = convert(model_dir, sharded[tp], tp, force=True, show_progress=False)
        evict(source_files)
        raw_read, raw_write = raw_copy_seconds(source_files, cache_root)
        yardstick = raw_read + raw_write * report.bytes_written / max(report.bytes_read, 1)
        results["convert"].append({"tp": tp, "seconds": report.seconds, "bytes_read": report.bytes_read,
                                   "bytes_written": report.bytes_written, "raw_read_seconds": raw_read,
                                   "raw_write_seconds": raw_write, "ratio_to_raw": yardstick / report.seconds})
        say(f"convert TP={tp}: {report.seconds:.2f}s ({yardstick / report.seconds:.2f}x raw read+write)")
    all_files = source_files + [f for tp in tp_sizes for f in weight_files(sharded[tp])]
    for cache in ("warm", "cold"):
        for tp in tp_sizes:
            files_by_rank = rank_files(sharded[tp])

            def prepare(files: list[Path], cache: str = cache) -> int | None:
                return warm_or_cold(files, cache, all_files)

            def record(name: str, result: dict, resident: int | None, tp: int = tp, cache: str = cache) -> None:
                results["runs"].append({"name": name, "tp": tp, "cache": cache, "resident_before": resident,
                                        **result})
                rate = f" {result['gb_per_s']:.2f} GB/s" if result.get("gb_per_s") else ""
                shown = f"{result['seconds']:.3f}s{rate}" if "seconds" in result else result.get("error", "")
                say(f"[{cache} TP={tp}] {name}: {shown}")

            for name, load_format, io, threads, on_sharded in SHARDSTATE_RUNS:
                source = sharded[tp] if on_sharded else model_dir
                resident = prepare(weight_files(source))
                record(name, shardstate_run(source, tp, load_format, io, threads), resident)
            resident = prepare([f for files in files_by_rank for f in files])
            record("limit (readinto)", summarize(run_ranks("limit_read", files_by_rank)), resident)
            resident = prepare([f for files in files_by_rank for f in files])
            record("safetensors load_file+copy", summarize(run_ranks("safetensors_copy", files_by_rank,
                                                                     str(sharded[tp]))), resident)
            for name, source, load_format in (("vLLM sharded_state", sharded[tp], "sharded_state"),
                                              ("vLLM default", model_dir, "auto")):
                if vllm_python is None:
                    record(name, {"error": "not run: no vLLM (make test-vllm sets up .venv-vllm)"}, None)
                    continue
                resident, outcome = vllm_median(vllm_python, source, tp, load_format, prepare)
                if "seconds" in outcome:  # default: every rank reads everything; sharded: each its own
                    nbytes = sum(f.stat().st_size for f in weight_files(source)) * (1 if source == sharded[tp] else tp)
                    rate = nbytes / outcome["seconds"] / 1e9 if outcome["seconds"] else None  # logged to 0.01 s
                    outcome = {**outcome, "bytes_read": nbytes, "gb_per_s": rate}
                record(name, outcome, resident)
            resident = prepare(weight_files(model_dir))
            outcome = transformers_tp_load(model_dir, tp, "bfloat16", PROMPT)
            if "seconds" in outcome:  # each rank reads its slices (through safetensors' mmap)
                nbytes = results["model"]["bytes"]
                outcome = {**outcome, "bytes_read": nbytes, "gb_per_s": nbytes / outcome["seconds"] / 1e9}
            record("transformers tp_plan=auto", outcome, resident)
    for tp in tp_sizes:
        results["verify_cost"].extend(verify_cost(sharded[tp], tp, rounds=1 if smoke else VERIFY_ROUNDS))
    from shardstate.benchmark.quantized import run_quantized_loads

    results["quantized"] = run_quantized_loads(out_dir, cache_root, 2 if 2 in tp_sizes else tp_sizes[0], smoke)
    from shardstate.benchmark.remote import run_remote

    results["remote"] = run_remote(out_dir, cache_root, 2 if 2 in tp_sizes else tp_sizes[0], smoke)
    from shardstate.benchmark.warm_path import run_warm_path

    results["warm_path"] = run_warm_path(out_dir, cache_root, tuple(tp for tp in tp_sizes if tp <= 2) or tp_sizes[:1],
                                         vllm_python, smoke)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_reports(results, out_dir)
    return results
