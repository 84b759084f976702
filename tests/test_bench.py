"""The benchmark's smoke mode: the whole harness on a tiny model (correctness only, no timing asserted)."""

from __future__ import annotations

import json

from shardstate.benchmark import run_bench


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
