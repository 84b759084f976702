"""The benchmark's smoke mode: the whole harness on a tiny model (correctness only, no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardstate.benchmark import run_bench
from shardstate.benchmark.families import run_families
from shardstate.benchmark.remote import EMPTY_CACHE, SLICED_CHECKPOINT, WARM_CACHE
from shardstate.benchmark.runai_peer import available as runai_available


def test_bench_smoke(tmp_path):
    results = run_bench(tmp_path / "out", tmp_path / "cache", smoke=True, tp_sizes=(2,), vllm_python=None)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == results["runs"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| sharded read |" in table and "every shardstate load path gave the same tokens: yes" in table
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    runs = {(r["name"], r["cache"]): r for r in results["runs"]}
    for cache in ("warm", "cold"):
        for name in ("default", "sliced", "sharded read", "sharded read 1 thread", "sharded mmap",
                     "sharded direct", "limit (readinto)", "safetensors load_file+copy"):
            run = runs[name, cache]
            assert len(run["per_rank"]) == 2 and all(r["bytes_read"] > 0 and r["peak_rss"] > 0 for r in run["per_rank"])
        # peers that cannot run are reported with the reason, not dropped
        assert "not run" in runs["vLLM sharded_state", cache]["error"]
        peer = runs["transformers tp_plan=auto", cache]  # a real peer: torchrun, gloo, accelerate
        assert len(peer["per_rank"]) == 2 and peer["seconds"] > 0, peer
    for name in ("sharded read", "limit (readinto)"):
        assert runs[name, "cold"]["resident_before"] in (0, None)  # evicted before the cold run
        assert runs[name, "warm"]["resident_before"] is None or runs[name, "warm"]["resident_before"] > 0
    limit = runs["limit (readinto)", "warm"]
    sharded = runs["sharded read", "warm"]
    assert limit["bytes_read"] >= sharded["bytes_read"]  # the limit reads whole rank files
    assert {tuple(r["tokens"]) for r in results["runs"] if r.get("shardstate")} == {tuple(sharded["tokens"])}
    assert [(c["tp"], c["io"]) for c in results["verify_cost"]] == [(2, "read"), (2, "mmap")]
    assert [c["tp"] for c in results["convert"]] == [2]
    quantized = {(r["method"], r["cache"]): r for r in results["quantized"]}
    assert set(quantized) == {(m, c) for m in ("bf16", "int8", "fp8") for c in ("warm", "cold")}
    for cache in ("warm", "cold"):  # quantized states read fewer bytes (the tiny model's embeddings stay bf16)
        bf16 = quantized["bf16", cache]["bytes_per_rank"]
        assert all(q < b for q, b in zip(quantized["int8", cache]["bytes_per_rank"], bf16, strict=True))
    assert "| fp8 | cold |" in (tmp_path / "out" / "quantized-loads.md").read_text()
    remote = {r["name"]: r for r in results["remote"]}
    own, whole = remote["boto3, own files"]["bytes_per_rank"], remote["boto3, whole state"]["bytes_per_rank"]
    assert remote[EMPTY_CACHE]["bytes_per_rank"] == own  # each rank fetched its files
    assert remote[WARM_CACHE]["bytes_per_rank"] == [0, 0]  # and later found them in the cache
    assert all(0 < n < sum(own) for n in remote[SLICED_CHECKPOINT]["bytes_per_rank"])  # its slices, not all
    assert whole == [sum(own)] * 2
    warm_path = {r["name"]: r for r in results["warm_path"]}  # TP=2, warm only in smoke
    assert {r["cache"] for r in results["warm_path"]} == {"warm"}
    assert warm_path["sharded read"]["bytes_prefaulted"] > 0  # both ranks' memory reserved at their start
    assert warm_path["sharded read, no prefault"]["bytes_prefaulted"] == 0
    assert "not run" in warm_path["vLLM sharded_state"]["error"]
    assert "sharded read / limit, warm" in (tmp_path / "out" / "warm-path.md").read_text()


@pytest.mark.slow
def test_bench_families_smoke(tmp_path):
    """The per-family rows for a dense and an MoE family (the harness is the same for all): at TP=2 default
    reads the whole checkpoint on each rank, sliced and sharded about half, all with the same tokens."""
    families = ("Qwen2ForCausalLM", "Qwen3MoeForCausalLM")
    rows = run_families(tmp_path / "out", tmp_path / "cache", tp=2, smoke=True, architectures=families)
    assert {r["architecture"] for r in rows} == set(families) and all(r["same_tokens"] for r in rows)
    for architecture in {r["architecture"] for r in rows}:
        mine = {r["load"]: r for r in rows if r["architecture"] == architecture}
        whole = mine["default"]["checkpoint_bytes"]
        assert all(b >= whole for b in mine["default"]["bytes_per_rank"]), architecture
        assert all(b < 0.75 * whole for b in mine["sharded"]["bytes_per_rank"]), architecture
    assert "| Qwen3MoeForCausalLM |" in (tmp_path / "out" / "families.md").read_text()


@pytest.mark.skipif(not runai_available(), reason="runai-model-streamer is a bench-only dependency: `make bench` "
                                                   "installs it")
def test_bench_runai_smoke(tmp_path):
    """bench --runai on the tiny model at TP=1, no vLLM: the streamer and shardstate each give the rank its
    tensors' bytes from disk and from SeaweedFS, and the table puts each ratio beside its goal."""
    from shardstate.benchmark.runai_peer import SHARDSTATE, SHARDSTATE_S3, STREAMER, STREAMER_S3, run_runai

    rows = run_runai(tmp_path / "out", tmp_path / "cache", (1,), None, smoke=True)
    assert json.loads((tmp_path / "out" / "peers.json").read_text()) == rows
    by = {(r["where"], r["cache"], r["name"]): r for r in rows}
    tensors = by["local", "warm", STREAMER]["bytes_read"]
    for key in (("local", "cold", STREAMER), ("s3", "warm", STREAMER_S3)):
        assert by[key]["bytes_read"] == tensors, key  # every tensor of the rank's file, wherever it lives
    for key in (("local", "warm", SHARDSTATE), ("local", "cold", SHARDSTATE), ("s3", "warm", SHARDSTATE_S3)):
        assert by[key]["seconds"] > 0 and by[key]["bytes_read"] >= tensors, key
    assert all("not run" in r["error"] for r in rows if r["where"] == "vllm")
    table = (tmp_path / "out" / "peers.md").read_text()
    assert f"| local | 1 | cold | {SHARDSTATE} over {STREAMER} | >= 1.0 |" in table


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    """bench/gpu_check.py is the one script a session with a lent GPU runs: on this machine it takes its CPU
    fallback (the same load paths onto the CPU), so that a device session never finds it broken. It exits 1
    unless every path's weights equal default's, its tokens are equal and save/convert --quantize agree."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert results["machine"]["device"] == "cpu"
    loads = [r for r in results["runs"] if "tokens_equal" in r]
    assert {r["cache"] for r in loads} == {"warm", "cold"} and all(r["tokens_equal"] for r in loads)
    assert all(r["weights_identical"] for r in loads if r["cache"] == "warm")
    assert set(results["quantized_save_matches_convert"]) == {"int8", "fp8"}
    assert all(results["quantized_save_matches_convert"].values())
    assert results["yardsticks"]["threaded_read_gb_per_s"] > 0 and results["goal_sharded_read_vs_bound"] > 0
