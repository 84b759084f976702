"""`shardstate bench --remote` (and `make bench`): loading a sharded state from S3-compatible storage.
A SeaweedFS server on 127.0.0.1 holds the benchmark model's state at one TP size and its HF checkpoint;
ways to get each rank its bytes, every rank in its own process, started together (the slowest rank's
seconds):
- shardstate, empty cache: `LLM("s3://...")`: each rank fetches its own files (parallel ranged GETs
  straight into load memory through the engine, checked against the manifest); the node cache is written
  in the background after the load (LLM.close waits for it, outside the timed load);
- shardstate, warm cache: the same again: every file checked in the cache, then loaded;
- shardstate sliced, HF checkpoint: each rank reads the extents of its slices from the checkpoint's
  objects in place (`--load-format sliced` on the checkpoint's s3:// location);
- boto3, own files: each rank downloads just its files into memory with plain boto3 (the yardstick);
- boto3, whole state: each rank downloads every rank's files, as a loader that reads everything would.
The goal (issue 20): the empty-cache load at >= 0.9x boto3's speed on the same bytes (boto3's seconds
over shardstate's), both ranks at once. Writes remote.json and remote.md."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from shardstate.benchmark import ensure_model, environment, say, summarize, write_rows
from shardstate.benchmark.ranks import run_ranks
from shardstate.benchmark.seaweedfs import available, s3_server
from shardstate.convert import convert
from shardstate.format.sharded_state import open_sharded_state
from shardstate.runtime.llm import LLM
from shardstate.store.upload import upload_state

BUCKET = "shardstate-bench"
REPEATS = 3
EMPTY_CACHE = "shardstate, empty cache: fetch into memory + check (cache written after)"
SPEED_GOAL = 0.9  # the empty-cache load's speed over boto3's, own files, both ranks at once
WARM_CACHE = "shardstate, warm cache: check + load"
SLICED_CHECKPOINT = "shardstate sliced, HF checkpoint read in place"


def run_remote(out_dir: Path, cache_root: Path, tp: int, smoke: bool = False) -> list[dict]:
    if not available():
        say("remote: not run (no SeaweedFS: `make` installs it)")
        return []
    model_dir = ensure_model(cache_root, smoke)
    state = cache_root / f"{model_dir.name}-tp{tp}-ids"
    if not (state / "shardstate.json").is_file():
        convert(model_dir, state, tp, force=True, show_progress=False)
    manifest = open_sharded_state(state).manifest
    assert manifest is not None
    own = [manifest.rank_files(rank) for rank in range(tp)]
    every = [sorted(manifest.files)] * tp
    work = Path(tempfile.mkdtemp(prefix="shardstate-remote-bench-", dir=cache_root))
    rows: list[dict] = []
    try:
        with s3_server(work / "seaweedfs") as server, environment(server.env()):  # the workers and boto3 read it
            server.client().create_bucket(Bucket=BUCKET)
            url, checkpoint = f"s3://{BUCKET}/{state.name}", f"s3://{BUCKET}/{model_dir.name}"
            upload_state(state, url)
            for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
                server.client().upload_file(str(path), BUCKET, f"{model_dir.name}/{path.name}")
            if not smoke:  # untimed: the server's files in its page cache for all
                run_ranks("s3_download", every, url)
            for _ in range(1 if smoke else REPEATS):
                rows.extend(_shardstate_rows(url, checkpoint, tp, work))
                rows.append({"name": "boto3, own files", **summarize(run_ranks("s3_download", own, url))})
                rows.append({"name": "boto3, whole state", **summarize(run_ranks("s3_download", every, url))})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = _medians(rows, tp)
    for row in medians:
        megabytes = max(row["bytes_per_rank"]) / 1e6
        say(f"[remote TP={tp}] {row['name']}: {row['seconds']:.3f}s, {megabytes:.0f} MB per rank")
    return write_rows(out_dir, "remote", medians, remote_table(medians, model_dir.name))


def _shardstate_rows(url: str, checkpoint: str, tp: int, work: Path) -> list[dict]:
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # empty: every rank fetches
    try:
        return [_load_row(EMPTY_CACHE, url, tp, cache), _load_row(WARM_CACHE, url, tp, cache),
                _load_row(SLICED_CHECKPOINT, checkpoint, tp, cache, "sliced")]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _load_row(name: str, url: str, tp: int, cache: Path, load_format: str = "auto") -> dict:
    with LLM(url, tensor_parallel_size=tp, cache_dir=cache, load_format=load_format) as llm:
        reports = llm.load_reports
    over_network = [r.bytes_read if load_format == "sliced" else r.bytes_fetched for r in reports]
    per_rank = [{"rank": r.rank, "seconds": r.seconds, "fetch_seconds": r.fetch_seconds, "bytes_read": n,
                 "peak_rss": r.peak_rss} for r, n in zip(reports, over_network, strict=True)]
    return {"name": name, **summarize(per_rank), "fetch_seconds": max(r.fetch_seconds for r in reports) or None}


def _medians(rows: list[dict], tp: int) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["seconds"])
        median = runs[len(runs) // 2]
        out.append({"name": name, "tp": tp, "seconds": median["seconds"], "seconds_each": [r["seconds"] for r in runs],
                    "fetch_seconds": median.get("fetch_seconds"),
                    "bytes_per_rank": [r["bytes_read"] for r in median["per_rank"]]})
    return out


def remote_table(rows: list[dict], model: str) -> str:
    base = next(r["seconds"] for r in rows if r["name"] == "boto3, own files")
    lines = [f"{model} at TP={rows[0]['tp']} from SeaweedFS on 127.0.0.1 (this machine), median of "
             f"{len(rows[0]['seconds_each'])}; seconds: the slowest rank's.", "",
             "| how | MB per rank over the network | seconds | vs boto3 own files |", "|---|---|---|---|"]
    for r in rows:
        fetch = f" (fetch {r['fetch_seconds']:.3f})" if r.get("fetch_seconds") is not None else ""
        lines.append(f"| {r['name']} | {max(r['bytes_per_rank']) / 1e6:.0f} | {r['seconds']:.3f}{fetch} | "
                     f"{r['seconds'] / base:.2f}x |")
    empty = next(r["seconds"] for r in rows if r["name"] == EMPTY_CACHE)
    lines += ["", f"- empty-cache load speed vs boto3 own files (boto3 seconds / shardstate's; target >= "
                  f"{SPEED_GOAL}): {base / empty:.2f} ({base / empty / SPEED_GOAL:.2f}x the goal)"]
    return "\n".join(lines) + "\n"
