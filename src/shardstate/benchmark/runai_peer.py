"""`shardstate bench --runai` (and `make bench`): Run:ai Model Streamer (runai-model-streamer 0.17.1, a bench-only
dependency that `make bench` installs) as a peer on the benchmark model's sharded state, at each TP size, every
rank in its own process, started together (the slowest rank's seconds; the median of REPEATS interleaved rounds):
- local disk, warm and cold page cache: the streamer's SafetensorsStreamer reading each rank's files into CPU
  tensors (its default strategy, O_DIRECT io_uring, and its buffered io_uring), against shardstate's sharded
  read of the same files into the model's parameters (`LLM(state)`) and the machine's limit (readinto);
- SeaweedFS on 127.0.0.1: the streamer reading the same files as s3:// objects, against shardstate's load
  from S3 with an empty node cache and plain boto3 downloading the same bytes into memory;
- vLLM (its CPU build, when there): `runai_streamer_sharded` against `sharded_state` and shardstate's plugin
  with `state=` the same directory, each timed by its own log line.
Writes peers.json and peers.md: each row's seconds, and shardstate's speed-up over each peer beside its goal."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardstate.benchmark import (
    ensure_model,
    environment,
    rank_files,
    say,
    shardstate_run,
    summarize,
    warm_or_cold,
    weight_files,
    write_rows,
)
from shardstate.benchmark.ranks import run_ranks
from shardstate.convert import convert
from shardstate.memory import peak_rss_bytes

REPEATS = 3
VLLM_REPEATS = 1  # a vLLM start takes ~45 s here
BUCKET = "shardstate-bench"
STREAMER = "Run:ai streamer (default: io_uring O_DIRECT)"
STREAMER_BUFFERED = "Run:ai streamer, io_uring buffered"
SHARDSTATE = "shardstate sharded read"
LIMIT = "limit (readinto)"
STREAMER_S3 = "Run:ai streamer, s3://"
SHARDSTATE_S3 = "shardstate s3://, empty node cache"
BOTO3 = "boto3, own files"
VLLM_RUNAI = "vLLM runai_streamer_sharded"
VLLM_SHARDED = "vLLM sharded_state"
VLLM_PLUGIN = "vLLM shardstate state="
GOALS = [  # (where, shardstate's way, the peer's way): the peer's seconds over shardstate's, goal >= 1.0
    ("local", SHARDSTATE, STREAMER), ("local", SHARDSTATE, STREAMER_BUFFERED),
    ("s3", SHARDSTATE_S3, STREAMER_S3), ("s3", BOTO3, STREAMER_S3),
    ("vllm", VLLM_PLUGIN, VLLM_RUNAI), ("vllm", VLLM_SHARDED, VLLM_RUNAI),
]
BUFFERED = {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered"}
S3_PATH_STYLE = {"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}  # SeaweedFS on 127.0.0.1: no bucket host names


def available() -> bool:
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        return False
    return True


def stream(rank: int, tp_size: int, files: list[str], barrier: Any, env: dict[str, str]) -> dict:
    """One rank (run_ranks): the streamer's SafetensorsStreamer over the rank's files (paths or s3:// URLs) into
    CPU tensors that the rank keeps (its default `owned=True`, as vLLM's iterator uses it), nothing copied."""
    os.environ.update(env)  # read by the library when it starts its engine
    from runai_model_streamer import SafetensorsStreamer

    barrier.wait()
    start = time.perf_counter()
    tensors = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(files)
        for name, tensor in streamer.get_tensors():
            tensors[name] = tensor
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"rank": rank, "seconds": seconds, "bytes_read": nbytes, "peak_rss": peak_rss_bytes()}


def _streamer(files: list[list[str]], env: dict[str, str]) -> dict:
    return summarize(run_ranks(f"{__name__}:stream", files, env))


def run_runai(out_dir: Path, cache_root: Path, tp_sizes: tuple[int, ...], vllm_python: Path | None,
              smoke: bool = False) -> list[dict]:
    model_dir = ensure_model(cache_root, smoke)
    states = {}
    for tp in tp_sizes:
        states[tp] = cache_root / f"{model_dir.name}-tp{tp}-ids"  # the state the other benchmarks use
        if not (states[tp] / "shardstate.json").is_file():
            convert(model_dir, states[tp], tp, force=True, show_progress=False)
    repeats = 1 if smoke else REPEATS
    every = weight_files(model_dir) + [f for tp in tp_sizes for f in weight_files(states[tp])]
    rows: list[dict] = []
    for cache in ("warm", "cold"):
        for tp in tp_sizes:
            rows += _local_rows(states[tp], tp, cache, every, repeats)
    rows += _s3_rows(model_dir, states, repeats)
    for cache in ("warm", "cold"):
        for tp in tp_sizes:
            rows += _vllm_rows(vllm_python, model_dir, states[tp], tp, cache, every, VLLM_REPEATS)
    return write_rows(out_dir, "peers", rows, table(rows, model_dir.name))


def _median_rows(ways: dict[str, Callable[[], dict]], tp: int, where: str, cache: str, repeats: int) -> list[dict]:
    """Every way once per round, rounds interleaved (the machine's load drifts); each way's median round."""
    outcomes: dict[str, list[dict]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, run in ways.items():
            outcomes[name].append(run())
    rows = []
    for name, runs in outcomes.items():
        good = sorted((r for r in runs if "seconds" in r), key=lambda r: r["seconds"])
        row = {"name": name, "where": where, "tp": tp, "cache": cache}
        if good:
            median = good[len(good) // 2]
            row |= {"seconds": median["seconds"], "seconds_each": [r["seconds"] for r in runs if "seconds" in r],
                    **{k: median[k] for k in ("bytes_read", "per_rank", "start_seconds") if k in median}}
        else:
            row["error"] = runs[-1].get("error", "no result")
        rows.append(row)
        shown = f"{row['seconds']:.3f}s" if good else row["error"]
        say(f"[runai {where} {cache} TP={tp}] {name}: {shown}")
    return rows


def _local_rows(state: Path, tp: int, cache: str, every: list[Path], repeats: int) -> list[dict]:
    files = rank_files(state)
    flat = [f for fs in files for f in fs]

    def prepared(run: Callable[[], dict]) -> Callable[[], dict]:
        def once() -> dict:
            resident = warm_or_cold(flat, cache, every)
            return {**run(), "resident_before": resident}
        return once

    paths = [[str(f) for f in fs] for fs in files]
    ways = {
        SHARDSTATE: prepared(lambda: shardstate_run(state, tp, "sharded", "read", None)),
        STREAMER: prepared(lambda: _streamer(paths, {})),
        STREAMER_BUFFERED: prepared(lambda: _streamer(paths, BUFFERED)),
        LIMIT: prepared(lambda: summarize(run_ranks("limit_read", files))),
    }
    return _median_rows(ways, tp, "local", cache, repeats)


def _s3_rows(model_dir: Path, states: dict[int, Path], repeats: int) -> list[dict]:
    from shardstate.benchmark.remote import EMPTY_CACHE, _load_row
    from shardstate.benchmark.seaweedfs import available as have_seaweedfs
    from shardstate.benchmark.seaweedfs import s3_server
    from shardstate.store.upload import upload_state

    if not have_seaweedfs():
        say("runai s3: not run (no SeaweedFS: `make` installs it)")
        return []
    work = Path(tempfile.mkdtemp(prefix="shardstate-runai-bench-", dir=states[min(states)].parent))
    rows: list[dict] = []
    try:
        with s3_server(work / "seaweedfs") as server, environment(server.env()):
            server.client().create_bucket(Bucket=BUCKET)
            for tp, state in states.items():
                url = f"s3://{BUCKET}/{state.name}"
                upload_state(state, url)
                own = [[f.name for f in fs] for fs in rank_files(state)]
                objects = [[f"{url}/{name}" for name in names] for names in own]
                run_ranks("s3_download", own, url)  # untimed: the server's files in its page cache for all

                def empty_cache(url: str = url, tp: int = tp) -> dict:
                    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
                    try:
                        return _load_row(EMPTY_CACHE, url, tp, cache)
                    finally:
                        shutil.rmtree(cache, ignore_errors=True)

                ways = {
                    SHARDSTATE_S3: empty_cache,
                    STREAMER_S3: lambda objects=objects: _streamer(objects, S3_PATH_STYLE),
                    BOTO3: lambda own=own, url=url: summarize(run_ranks("s3_download", own, url)),
                }
                rows += _median_rows(ways, tp, "s3", "warm", repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _vllm_rows(python: Path | None, model_dir: Path, state: Path, tp: int, cache: str, every: list[Path],
               repeats: int) -> list[dict]:
    from shardstate.benchmark.vllm_plugin import plugin_run

    if python is None:
        return [{"name": name, "where": "vllm", "tp": tp, "cache": cache,
                 "error": "not run: no vLLM (make test-vllm sets up .venv-vllm)"}
                for name in (VLLM_RUNAI, VLLM_SHARDED, VLLM_PLUGIN)]
    files = weight_files(state)

    def start(model: Path, load_format: str, extra: dict | None = None) -> Callable[[], dict]:
        def once() -> dict:
            warm_or_cold(files, cache, every)
            return plugin_run(python, model, tp, load_format, extra, {})
        return once

    ways = {VLLM_RUNAI: start(state, "runai_streamer_sharded"), VLLM_SHARDED: start(state, "sharded_state"),
            VLLM_PLUGIN: start(model_dir, "shardstate", {"state": str(state)})}
    return _median_rows(ways, tp, "vllm", cache, repeats)


def table(rows: list[dict], model: str) -> str:
    """Each way's seconds per TP and cache, then shardstate's speed-up over each peer beside its goal."""
    rounds = max((len(r.get("seconds_each", [])) for r in rows if r["where"] != "vllm"), default=0)
    lines = [f"{model}, each rank's files of its sharded state; seconds: the slowest rank's, every rank at once, "
             f"median of {rounds} interleaved rounds; vLLM: {VLLM_REPEATS} start each, its own log line for the "
             f"weights (`Loading weights took`, the plugin's `read ... in S s`).", "",
             "| where | TP | cache | way | seconds | GB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" in r:
            rate = f"{r['bytes_read'] / r['seconds'] / 1e9:.2f}" if r.get("bytes_read") and r["seconds"] else ""
            shown = f"{r['seconds']:.3f} | {rate}"
        else:
            shown = f"{r.get('error')} | "
        lines.append(f"| {r['where']} | {r['tp']} | {r['cache']} | {r['name']} | {shown} |")
    lines += ["", "| where | TP | cache | speed-up (peer seconds / ours) | goal | ratio |", "|---|---|---|---|---|---|"]
    by = {(r["where"], r["tp"], r["cache"], r["name"]): r.get("seconds") for r in rows}
    for where, tp, cache in dict.fromkeys((r["where"], r["tp"], r["cache"]) for r in rows):
        for goal_where, ours, peer in GOALS:
            a, b = by.get((where, tp, cache, ours)), by.get((where, tp, cache, peer))
            if goal_where == where and a and b:
                lines.append(f"| {where} | {tp} | {cache} | {ours} over {peer} | >= 1.0 | {b / a:.2f} |")
    return "\n".join(lines) + "\n"

