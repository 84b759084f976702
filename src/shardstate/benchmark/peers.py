"""Peers run in their own environment: vLLM's CPU build (its sharded_state and default loaders, timed by
its own "Loading weights took" log line) and transformers' tensor-parallel from_pretrained."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from shardstate.benchmark import vllm_peer

LOAD_LINE = re.compile(r"Loading weights took ([0-9.]+) seconds")


def vllm_load(python: Path, model_dir: Path, tp_size: int, load_format: str, dtype: str) -> dict:
    """{"seconds": slowest rank's load} or {"error": why it could not run}."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    if tp_size > (os.cpu_count() or 1):
        return {"error": f"vLLM's CPU backend binds one core per rank; this machine has {os.cpu_count()}"}
    args = [str(python), vllm_peer.__file__, "load", str(model_dir), "--tp", str(tp_size), "--load-format",
            load_format, "--dtype", dtype]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 900 s"}
    times = [float(t) for t in LOAD_LINE.findall(result.stdout + result.stderr)]
    if result.returncode != 0 or not times:
        lines = (result.stdout + result.stderr).splitlines()
        errors = [ln for ln in lines if "Error" in ln] or lines[-1:] or ["no output"]
        return {"error": f"exit {result.returncode}: {errors[-1].strip()[:200]}"}
    return {"seconds": max(times)}


def transformers_tp_status() -> dict:
    """transformers' from_pretrained(tp_plan="auto") under torchrun (it needs accelerate) is not wired
    into this benchmark yet; it is reported as such rather than left out."""
    return {"error": "not attempted yet (needs a torchrun harness and accelerate)"}
