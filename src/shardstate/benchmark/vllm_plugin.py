"""`shardstate bench --vllm`: vLLM's own start, with each way of getting it its weights, on the benchmark model
(vLLM's CPU build in .venv-vllm, bf16, each run a fresh `LLM(...)` in a process of its own):
- `auto` (vLLM's default loader on the HF checkpoint) and `sharded_state` (on `shardstate convert`'s output):
  timed by vLLM's "Loading weights took" line;
- shardstate miss (an empty cache: the default loader, then each rank's state into a new entry), hit (that
  entry) and `state=s3://...` (the state in SeaweedFS on 127.0.0.1, an empty node cache): timed by the
  plugin's own line per rank (for the miss: the default load plus the cache write);
and for every run the whole `LLM(...)` construction ("start"). Warm: the files read once before; cold:
evicted from the page cache (the S3 row is warm only: the server's files are its own). Writes
vllm-plugin.json and vllm-plugin.md with the issue's goals as ratios measured in the same run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from shardstate.benchmark import ensure_model, environment, say, warm_or_cold, weight_files, write_rows
from shardstate.benchmark.peers import LOAD_LINE, failure, run_peer
from shardstate.benchmark.seaweedfs import available, s3_server
from shardstate.convert import convert
from shardstate.store.upload import upload_state

BUCKET = "shardstate-bench"
REPEATS = 1
AUTO, SHARDED, MISS, HIT, UNVERIFIED, S3 = ("vLLM auto", "vLLM sharded_state", "shardstate miss", "shardstate hit",
                                            "shardstate hit, verify off", "shardstate state=s3://")
MISS_LINE = re.compile(r"shardstate: miss \S+: rank \d+ loaded by vLLM's default loader in ([0-9.]+) s, cached \d+ "
                       r"bytes in ([0-9.]+) s")
READ_LINE = re.compile(r"shardstate: (?:hit|state) \S+: rank \d+ read \d+ bytes in \d+ files in ([0-9.]+) s")
PEER = Path(__file__).with_name("vllm_peer.py")


def plugin_run(python: Path, model: Path, tp: int, load_format: str, extra: dict | None,
               env: dict[str, str]) -> dict:
    """{"seconds": the slowest rank's weights, "start_seconds": the whole LLM(...)} or {"error": ...}."""
    if tp > (os.cpu_count() or 1):
        return {"error": f"vLLM's CPU backend binds one core per rank; this machine has {os.cpu_count()}"}
    args = [str(python), str(PEER), "load", str(model), "--tp", str(tp), "--load-format", load_format,
            "--dtype", "bfloat16"]
    if extra is not None:
        args += ["--extra-config", json.dumps(extra)]
    result = run_peer(args, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env})
    if result is None:
        return {"error": "timed out after 900 s"}
    text = result.stdout + result.stderr
    if load_format == "shardstate":
        misses = [float(a) + float(b) for a, b in MISS_LINE.findall(text)]
        times = misses or [float(t) for t in READ_LINE.findall(text)]
    else:
        times = [float(t) for t in LOAD_LINE.findall(text)]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith('{"')]
    if result.returncode != 0 or not times or not lines:
        return failure(result)
    return {"seconds": max(times), "start_seconds": json.loads(lines[-1])["start_seconds"]}


def run_vllm_plugin(out_dir: Path, cache_root: Path, python: Path, tp_sizes: tuple[int, ...],
                    smoke: bool = False) -> list[dict]:
    model_dir = ensure_model(cache_root, smoke)
    work = Path(tempfile.mkdtemp(prefix="shardstate-vllm-bench-", dir=cache_root))
    rows: list[dict] = []
    try:
        with s3_server(work / "seaweedfs") if available() else contextlib.nullcontext() as server:
            s3_env = server.env() if server is not None else {}
            if server is not None:
                server.client().create_bucket(Bucket=BUCKET)
            for tp in tp_sizes:
                state = cache_root / f"{model_dir.name}-tp{tp}-ids"
                if not (state / "shardstate.json").is_file():
                    convert(model_dir, state, tp, force=True, show_progress=False)
                url = None
                if server is not None:
                    url = f"s3://{BUCKET}/{state.name}"
                    with environment(s3_env):
                        upload_state(state, url)
                every = weight_files(model_dir) + weight_files(state)
                for cache in ("warm", "cold"):
                    rows += _runs(python, model_dir, state, url, s3_env, tp, cache, every, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_rows(out_dir, "vllm-plugin", rows, table(rows))
    return rows


def _runs(python: Path, model_dir: Path, state: Path, url: str | None, s3_env: dict, tp: int, cache: str,
          every: list[Path], work: Path) -> list[dict]:
    rows = []

    def record(name: str, outcomes: list[dict]) -> None:
        good = [o for o in outcomes if "seconds" in o]
        row = {"name": name, "tp": tp, "cache": cache}
        if good:
            row |= {"seconds": statistics.median(o["seconds"] for o in good),
                    "start_seconds": statistics.median(o["start_seconds"] for o in good)}
        else:
            row |= outcomes[-1]
        rows.append(row)
        shown = f"{row['seconds']:.2f}s (start {row['start_seconds']:.1f}s)" if good else row.get("error")
        say(f"[vllm {cache} TP={tp}] {name}: {shown}")

    for name, model, load_format, files in ((AUTO, model_dir, "auto", weight_files(model_dir)),
                                            (SHARDED, state, "sharded_state", weight_files(state))):
        outcomes = []
        for _ in range(REPEATS):
            warm_or_cold(files, cache, every)
            outcomes.append(plugin_run(python, model, tp, load_format, None, {}))
        record(name, outcomes)
    misses, hits, unverified = [], [], []
    for n in range(REPEATS):
        entries = work / f"cache-{tp}-{cache}-{n}"
        warm_or_cold(weight_files(model_dir), cache, every)
        misses.append(plugin_run(python, model_dir, tp, "shardstate", {"cache_dir": str(entries)}, {}))
        entry_files = sorted(p for p in entries.glob("*/*.safetensors"))
        for outcomes, verify in ((hits, True), (unverified, False)):
            warm_or_cold(entry_files, cache, every + entry_files)
            outcomes.append(plugin_run(python, model_dir, tp, "shardstate",
                                       {"cache_dir": str(entries), "verify": verify}, {}))
        shutil.rmtree(entries, ignore_errors=True)
    record(MISS, misses)
    record(HIT, hits)
    record(UNVERIFIED, unverified)
    if url is not None and cache == "warm":
        outcomes = []
        for n in range(REPEATS):
            node = work / f"node-{tp}-{n}"
            outcomes.append(plugin_run(python, model_dir, tp, "shardstate", {"state": url},
                                       {**s3_env, "SHARDSTATE_CACHE_DIR": str(node)}))
            shutil.rmtree(node, ignore_errors=True)
        record(S3, outcomes)
    return rows


def table(rows: list[dict]) -> str:
    """Per TP and cache: each way's weights and start seconds, then the goals as ratios."""
    lines = ["| TP | cache | way | weights (s) | LLM(...) start (s) |", "|---|---|---|---|---|"]
    for r in rows:
        shown = (f"{r['seconds']:.2f} | {r['start_seconds']:.1f}" if "seconds" in r else f"{r.get('error')} | ")
        lines.append(f"| {r['tp']} | {r['cache']} | {r['name']} | {shown} |")
    lines += ["", "| TP | cache | goal | ratio |", "|---|---|---|---|"]
    by = {(r["tp"], r["cache"], r["name"]): r.get("seconds") for r in rows}
    for tp, cache in sorted({(r["tp"], r["cache"]) for r in rows}):
        auto, sharded, miss, hit = (by.get((tp, cache, n)) for n in (AUTO, SHARDED, MISS, HIT))
        goal = 1.5 if cache == "cold" else 1.0
        for text, a, b in ((f"hit vs auto (goal >= {goal})", auto, hit),
                           (f"hit vs sharded_state (goal >= {goal})", sharded, hit),
                           ("auto vs miss: miss / auto (goal <= 1.15)", miss, auto)):
            if a and b:
                lines.append(f"| {tp} | {cache} | {text} | {a / b:.2f} |")
    return "\n".join(lines) + "\n"
