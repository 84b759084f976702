"""A sharded state loads at another TP size than it was saved at: each rank reads only the overlaps of its
boxes with the saved ranks' and gets exactly the tensors of a `convert --tp N` of the same state (the
independent reference: its rank files, read back with safetensors), for dense, tied, MoE and quantized
states, from local files and from S3 (ranged GETs of just those runs); bytes read per rank stay near its
own share where the layouts align; --verify checks what was read whole and counts what was not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import S3_BUCKET, checkpoint_maker, transformers_greedy
from rank_files import rank_tensors
from shardstate.convert import convert
from shardstate.format.safetensors_header import read_header
from shardstate.runtime.llm import LLM
from test_families import FAMILIES

BIN = Path(sys.executable).parent
BUCKET = S3_BUCKET
ALIGNED_READ_LIMIT = 1.25  # bytes read per rank / its own share, where saved boxes hold whole target boxes


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, FAMILIES, seed=11)


def own_share(state: Path, rank: int) -> int:
    """What a state converted for the running TP size holds for `rank`: its rank files' bytes."""
    return sum(p.stat().st_size for p in state.glob(f"model-rank-{rank}-part-*.safetensors"))


def assert_loads_as_its_convert(llm: LLM, direct: Path) -> None:
    """Every parameter of every rank equals the direct convert's tensor of that name, bit for bit."""
    for rank, live in enumerate(llm.rank_state_dicts()):
        stored = rank_tensors(direct, rank)
        assert live, rank
        for name, tensor in live.items():
            assert name in stored, name
            assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), (rank, name)


CASES = [  # (family, saved TP, running TP, --quantize of the states)
    ("qwen3-tied", 4, 2, None), ("qwen3-tied", 1, 2, None), ("qwen3-tied", 2, 1, None),
    ("qwen2-moe", 4, 2, None), ("mixtral", 1, 2, "int8"),
]


@pytest.mark.parametrize("name,saved_tp,tp,quantize", CASES, ids=[f"{c[0]}-{c[1]}to{c[2]}-{c[3]}" for c in CASES])
def test_a_state_loads_at_another_tp_size_as_its_convert(family_dir, tmp_path, name, saved_tp, tp, quantize):
    src = family_dir(name)
    saved, direct = tmp_path / f"tp{saved_tp}", tmp_path / f"tp{tp}"
    convert(src, saved, saved_tp, quantize=quantize, max_part_bytes=200_000)  # several parts per rank
    convert(saved, direct, tp)  # the reference: a reshard written to disk
    with LLM(saved, tensor_parallel_size=tp, verify=True) as llm:
        assert_loads_as_its_convert(llm, direct)
        reports = llm.load_reports
    ratios = [report.bytes_read / own_share(direct, rank) for rank, report in enumerate(reports)]
    print(f"{name} {saved_tp} -> {tp}: bytes read / own share per rank {[round(r, 3) for r in ratios]}, saved "
          f"tensors read in part (no digest to check) {[r.unverified_tensors for r in reports]}")
    assert all(report.resharded_from == saved_tp for report in reports)
    if saved_tp % tp == 0:  # each running rank's boxes are whole saved ranks' boxes
        assert all(ratio <= ALIGNED_READ_LIMIT for ratio in ratios), ratios


def test_a_state_loads_split_further_at_tp4(family_dir, tmp_path):
    """2 -> 4 (each saved box cut in two) for an MoE with a shared expert: the direct convert's tensors, and
    transformers' greedy tokens (no second 4-rank start for the direct state). Rank n reads within saved
    rank n // 2's files only: dim-1 splits in whole rows (a few large reads, not one per row:
    loaders/boxes.py), dim-0 splits exactly."""
    src = family_dir("qwen2-moe")
    convert(src, tmp_path / "tp2", 2)
    convert(src, tmp_path / "tp4", 4)
    prompts = [[1, 5, 9, 33, 7], [4, 100, 2]]
    expected = transformers_greedy(src, prompts, 6)[0]
    with LLM(tmp_path / "tp2", tensor_parallel_size=4) as llm:
        assert_loads_as_its_convert(llm, tmp_path / "tp4")
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=6, ignore_eos=True)] == expected
        ratios = [r.bytes_read / own_share(tmp_path / "tp4", n) for n, r in enumerate(llm.load_reports)]
        saved = [r.bytes_read / own_share(tmp_path / "tp2", n // 2) for n, r in enumerate(llm.load_reports)]
    print(f"qwen2-moe 2 -> 4: bytes read / own share per rank {[round(r, 3) for r in ratios]}, "
          f"/ its saved rank's share {[round(r, 3) for r in saved]}")
    assert all(ratio <= 1 for ratio in saved), (ratios, saved)


def shardstate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, timeout=180, env=env)


def test_verify_on_a_reshard_checks_what_was_read_whole(family_dir, tmp_path):
    """From the CLI: the load report says what it was resharded from; a flipped byte in a saved tensor the
    rank reads whole is refused naming it; one the rank reads only in part is counted as unverified."""
    convert(family_dir("qwen3-tied"), tmp_path / "tp4", 4)
    args = ["generate", str(tmp_path / "tp4"), "--tp", "2", "--prompt-ids", "1,5,9", "--max-new-tokens", "3",
            "--json", "--verify"]
    done = shardstate(*args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["load"]
    assert [r["resharded_from"] for r in report] == [4, 4]
    direct = shardstate("generate", str(tmp_path / "tp4"), "--tp", "4", *args[4:])
    assert json.loads(done.stdout)["outputs"] == json.loads(direct.stdout)["outputs"]
    name = "model.layers.1.mlp.down_proj.weight"
    manifest = json.loads((tmp_path / "tp4" / "shardstate.json").read_text())
    path = tmp_path / "tp4" / manifest["tensors"]["3"][name]["file"]
    data = bytearray(path.read_bytes())
    data[read_header(path).tensors[name].begin + 3] ^= 0x01
    path.write_bytes(bytes(data))
    refused = shardstate(*args)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"tensor '{name}' does not match its checksum in {path}" in refused.stderr


def test_a_state_without_a_manifest_is_not_resharded_on_load(family_dir, tmp_path):
    from test_sharded import strip_to_vllm_layout

    convert(family_dir("qwen3-tied"), tmp_path / "tp2", 2)
    strip_to_vllm_layout(tmp_path / "tp2")
    refused = shardstate("generate", str(tmp_path / "tp2"), "--tp", "1", "--prompt-ids", "1")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "saved for TP=2, running TP=1: a directory without shardstate.json (written by vLLM?) records no specs " \
           "to reshard from" in refused.stderr


def test_a_state_in_s3_reshards_on_load_fetching_only_its_share(server, family_dir, tmp_path, monkeypatch):
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    src = family_dir("qwen2-moe")
    convert(src, tmp_path / "tp4", 4)
    convert(src, tmp_path / "tp2", 2)
    url = f"s3://{BUCKET}/reshard-on-load/tp4"
    upload = shardstate("upload", str(tmp_path / "tp4"), url, env={**os.environ, **server.env()})
    assert upload.returncode == 0, upload.stderr
    cache = tmp_path / "cache"
    with LLM(url, tensor_parallel_size=2, cache_dir=cache) as llm:
        assert_loads_as_its_convert(llm, tmp_path / "tp2")
        reports = llm.load_reports
    ratios = [r.bytes_fetched / own_share(tmp_path / "tp2", n) for n, r in enumerate(reports)]
    print(f"qwen2-moe 4 -> 2 from S3: bytes fetched / own share per rank {[round(r, 3) for r in ratios]}")
    assert all(ratio <= ALIGNED_READ_LIMIT for ratio in ratios), ratios
    (cached,) = cache.iterdir()
    assert not list(cached.glob("model-rank-*"))  # read in place: no partial file in the cache
