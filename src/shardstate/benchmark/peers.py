"""Peers run in processes of their own: vLLM's CPU build in its own venv (its sharded_state and default
loaders, timed by its own "Loading weights took" log line) and transformers' tensor-parallel
from_pretrained under torchrun (timed by the peer script around the call)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from shardstate.benchmark import transformers_peer, vllm_peer
from shardstate.io.janitor import Janitor
from shardstate.parallel.distributed import cores_per_rank, free_port

LOAD_LINE = re.compile(r"Loading weights took ([0-9.]+) seconds")


def run_peer(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess | None:
    """Run a peer, and every process it starts, in a process group of its own: the group is killed when
    the peer is done, times out (None) or this run stops, and by a janitor if this process dies first."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    janitor = Janitor(process_group=proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        janitor.dismiss()


def failure(result: subprocess.CompletedProcess) -> dict:
    """{"error": exit code and the peer's last line naming an error (else its last line)}."""
    lines = (result.stdout + result.stderr).splitlines()
    errors = [ln for ln in lines if "Error" in ln] or lines[-1:] or ["no output"]
    return {"error": f"exit {result.returncode}: {errors[-1].strip()[:200]}"}


def vllm_load(python: Path, model_dir: Path, tp_size: int, load_format: str, dtype: str) -> dict:
    """{"seconds": slowest rank's load} or {"error": why it could not run}."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    if tp_size > (os.cpu_count() or 1):
        return {"error": f"vLLM's CPU backend binds one core per rank; this machine has {os.cpu_count()}"}
    args = [str(python), vllm_peer.__file__, "load", str(model_dir), "--tp", str(tp_size), "--load-format",
            load_format, "--dtype", dtype]
    result = run_peer(args, env)
    if result is None:
        return {"error": "timed out after 900 s"}
    times = [float(t) for t in LOAD_LINE.findall(result.stdout + result.stderr)]
    if result.returncode != 0 or not times:
        return failure(result)
    return {"seconds": max(times)}


def transformers_tp_load(model_dir: Path, tp_size: int, dtype: str, prompt: list[int]) -> dict:
    """transformers' from_pretrained(tp_plan="auto") under torchrun, in this Python: {"seconds": slowest
    rank, "per_rank": [...], "tokens": [...]} or {"error": why it could not run}."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp_size}",
                f"--master-port={free_port()}", transformers_peer.__file__, str(model_dir), out, "--dtype", dtype,
                "--prompt-ids", ",".join(map(str, prompt))]
        env = dict(os.environ, OMP_NUM_THREADS=str(cores_per_rank(tp_size)))
        result = run_peer(args, env)
        if result is None:
            return {"error": "timed out after 900 s"}
        ranks = [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank-*.json"))]
    if result.returncode != 0 or len(ranks) != tp_size:
        return failure(result)
    ranks.sort(key=lambda r: r["rank"])
    per_rank = [{"rank": r["rank"], "seconds": r["seconds"], "peak_rss": r["peak_rss"]} for r in ranks]
    return {"seconds": max(r["seconds"] for r in ranks), "per_rank": per_rank, "tokens": ranks[0]["tokens"]}
