"""Reproducible outputs: the state id is derived from the state's content (format/manifest.py:
state_id_of), so the same checkpoint at the same layout gives a byte-identical directory whichever way it
was made (`convert` twice, `save` from live workers, a reshard there and back), while states that differ
(one weight value, the TP size) still get different ids: a rank file of one is refused in the other."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from conftest import checkpoint_maker
from rank_files import assert_same_directory
from shardstate import LLM
from shardstate.convert import convert
from shardstate.format.safetensors_header import read_header
from shardstate.state_info import verify_state

PART = 40_000  # several parts per rank
MOE = {"qwen2-moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                             "shared_expert_intermediate_size": 48})}


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return checkpoint_maker(tmp_path_factory, MOE, seed=5)("qwen2-moe")


def state_id(directory: Path) -> str:
    """The manifest's state id, after checking every rank file records it and has the recorded crc32."""
    doc = json.loads((directory / "shardstate.json").read_text())
    for name, record in doc["files"].items():
        assert read_header(directory / name).metadata["state"] == doc["state_id"], name
        assert zlib.crc32((directory / name).read_bytes()) == record["crc32"], name
    return doc["state_id"]


@pytest.mark.parametrize("model,quantize", [("dense", None), ("moe", None), ("moe", "int8")])
def test_save_equals_convert_byte_for_byte(checkpoints, moe, tmp_path, model, quantize):
    src = checkpoints["gqa_untied"] if model == "dense" else moe
    with LLM(src, tensor_parallel_size=2, load_format="sliced", quantize=quantize) as llm:
        llm.save_sharded_state(tmp_path / "saved", max_size=PART)
    convert(src, tmp_path / "converted", 2, max_part_bytes=PART, quantize=quantize)
    assert_same_directory(tmp_path / "saved", tmp_path / "converted")
    state_id(tmp_path / "saved")
    assert all(check.ok for check in verify_state(tmp_path / "saved"))


def test_converts_and_a_reshard_there_and_back_are_byte_identical(checkpoints, tmp_path):
    src = checkpoints["gqa_untied"]
    convert(src, tmp_path / "tp2", 2, max_part_bytes=PART)
    convert(src, tmp_path / "again", 2, max_part_bytes=PART)
    assert_same_directory(tmp_path / "tp2", tmp_path / "again")
    convert(tmp_path / "tp2", tmp_path / "re4", 4, max_part_bytes=PART)
    convert(tmp_path / "re4", tmp_path / "re2", 2, max_part_bytes=PART)
    assert_same_directory(tmp_path / "re2", tmp_path / "tp2")
    convert(src, tmp_path / "tp4", 4, max_part_bytes=PART)
    assert_same_directory(tmp_path / "re4", tmp_path / "tp4")  # the reshard keeps the checkpoint's identity
    assert state_id(tmp_path / "tp4") != state_id(tmp_path / "tp2")


def test_one_weight_value_changes_the_state_id(checkpoints, tmp_path):
    """Two checkpoints alike in every name, size, header and config byte but one element: another id, so
    a rank file of one is refused in the other's directory."""
    src, other = checkpoints["gqa_untied"], tmp_path / "other"
    shutil.copytree(src, other)
    weights = next(other.glob("*.safetensors"))
    entry = read_header(weights).tensors["model.layers.1.mlp.down_proj.weight"]
    with open(weights, "r+b") as f:
        f.seek(entry.begin + 4 * 7)
        value = struct.unpack("<f", f.read(4))[0]
        f.seek(entry.begin + 4 * 7)
        f.write(struct.pack("<f", value + 0.5))
    convert(src, tmp_path / "a", 2)
    convert(other, tmp_path / "b", 2)
    a, b = (json.loads((tmp_path / n / "shardstate.json").read_text()) for n in "ab")
    assert (a["source"], a["config_sha256"]) == (b["source"], b["config_sha256"])
    assert state_id(tmp_path / "a") != state_id(tmp_path / "b")
    rank1 = "model-rank-1-part-0.safetensors"
    shutil.copy(tmp_path / "b" / rank1, tmp_path / "a" / rank1)
    a["files"][rank1] = b["files"][rank1]
    a["tensors"]["1"] = b["tensors"]["1"]
    (tmp_path / "a" / "shardstate.json").write_text(json.dumps(a))
    checks = {c.name: c for c in verify_state(tmp_path / "a")}
    assert not checks[rank1].ok and "records state=" in checks[rank1].problem


def test_save_after_loading_a_state_writes_that_state_again(checkpoints, tmp_path):
    convert(checkpoints["gqa_untied"], tmp_path / "state", 2, max_part_bytes=PART)
    with LLM(tmp_path / "state", tensor_parallel_size=2) as llm:
        llm.save_sharded_state(tmp_path / "saved", max_size=PART)
    assert_same_directory(tmp_path / "saved", tmp_path / "state")
