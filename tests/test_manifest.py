"""Manifests that cannot lie: each case edits a real sharded state the way a mistake (or a hand) would;
`generate`, `verify` and `inspect` refuse it with one line. The rank files' own records (state id, rank,
TP size, part in their metadata) catch what a consistent-looking manifest hides."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from shardstate.cli import main
from shardstate.convert import convert
from shardstate.format.safetensors_header import read_header
from shardstate.synthetic import make_llama_checkpoint

BIN = Path(sys.executable).parent
R0, R1 = "model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"
QKV = "model.layers.0.self_attn.qkv_proj.weight"


@pytest.fixture(scope="module")
def state(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "tp2"
    convert(checkpoints["gqa_untied"], out, 2)
    return out


@pytest.fixture(scope="module")
def other_state(checkpoints, tmp_path_factory) -> Path:
    """The same architecture and sizes, other weights: its files fit the first state's manifest exactly."""
    root = tmp_path_factory.mktemp("other")
    config = json.loads((checkpoints["gqa_untied"] / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    source = make_llama_checkpoint(root / "hf", seed=99, **{k: config[k] for k in keys})
    shutil.copy(checkpoints["gqa_untied"] / "config.json", source / "config.json")  # byte-equal config
    return convert(source, root / "tp2", 2) and root / "tp2"


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        doc = json.loads((directory / "shardstate.json").read_text())
        edit(doc)
        (directory / "shardstate.json").write_text(json.dumps(doc))

    return damage


def record_file(doc: dict, directory: Path, name: str) -> None:
    """Make the manifest's record of `name` agree with the file now there (size, checksum)."""
    data = (directory / name).read_bytes()
    doc["files"][name].update(size=len(data), crc32=zlib.crc32(data))


def swap_rank_files(directory: Path) -> None:
    """Ranks 0 and 1 swapped, with a manifest made to agree in every size, checksum and tensor record."""
    (directory / R0).rename(directory / "tmp")
    (directory / R1).rename(directory / R0)
    (directory / "tmp").rename(directory / R1)
    doc = json.loads((directory / "shardstate.json").read_text())
    doc["tensors"]["0"], doc["tensors"]["1"] = doc["tensors"]["1"], doc["tensors"]["0"]
    for rank, name in ((0, R0), (1, R1)):
        for record in doc["tensors"][str(rank)].values():
            record["file"] = name
        record_file(doc, directory, name)
    (directory / "shardstate.json").write_text(json.dumps(doc))


def file_from(other: Path) -> Callable[[Path], None]:
    """Rank 1's file replaced by the other state's (other weights), the manifest's checksums and digests
    updated to match: only the state id tells."""
    def damage(directory: Path) -> None:
        shutil.copy(other / R1, directory / R1)
        doc = json.loads((directory / "shardstate.json").read_text())
        theirs = json.loads((other / "shardstate.json").read_text())
        doc["tensors"]["1"] = theirs["tensors"]["1"]
        record_file(doc, directory, R1)
        (directory / "shardstate.json").write_text(json.dumps(doc))

    return damage


def pad_q(doc: dict, rows: int) -> None:
    doc["tensors"]["0"][QKV]["spec"]["parts"][0]["padded"] = rows


def drop_rank(doc: dict) -> None:
    del doc["tensors"]["1"]


CASES = {
    "swapped rank files": (swap_rank_files, f"{R0} records rank='1', the manifest says rank=0"),
    "file of another state": (None, f"{R1} records state="),
    "tp_size 10**12": (edit_manifest(lambda d: d.update(tp_size=10**12)),
                       "manifest field 'tp_size' is 1000000000000, not an integer in [1, 1024]"),
    "tp_size without its ranks": (edit_manifest(lambda d: d.update(tp_size=3)),
                                  "has parts [] for rank 2, not 0..n-1 (tp_size is 3)"),
    "file record with another rank": (
        edit_manifest(lambda d: d["files"][R0].update(rank=1)),
        f"manifest field files['{R0}'] says rank 1 part 0, but that file would be named {R1}"),
    "rank missing from tensors": (edit_manifest(drop_rank), "manifest field 'tensors' has ranks ['0'], not 0..1"),
    "dtype that disagrees with the files": (
        edit_manifest(lambda d: d.update(dtype="BF16")), ".dtype is F32, not one of the state's dtypes ['BF16']"),
    "quantized version 1": (
        edit_manifest(lambda d: d.update({**as_version_1(d), "quantization": {"method": "int8",
                                                                              "scales": "per-output-channel"}})),
        "version 1 states are never quantized"),
    "malformed spec": (edit_manifest(lambda d: pad_q(d, 65)), "65 (padded from 64) does not cut into 2 chunks"),
    "spec of another layout": (
        edit_manifest(lambda d: d["tensors"]["0"][QKV]["spec"]["parts"].reverse()),  # [v; k; q]: same shape
        f"tensor '{QKV}' of rank 0 is recorded with another layout than this model's"),
    "field of the wrong type": (edit_manifest(lambda d: d.update(files=[])), "manifest field 'files' is [], not an"),
    "unknown field": (edit_manifest(lambda d: d.update(extra=1)), "manifest field 'extra' is unknown"),
    "missing field": (edit_manifest(lambda d: d.pop("state_id")), "manifest lacks field 'state_id'"),
    "digest edited": (edit_manifest(lambda d: d["tensors"]["1"][QKV].update(xxh3_64="0" * 16)),
                      f"tensor '{QKV}' does not match its checksum"),
    "pattern with a format spec": (edit_manifest(lambda d: d.update(pattern="{rank:3000000000}{part}.safetensors")),
                                   "manifest field 'pattern' is '{rank:3000000000}{part}.safetensors', not"),
    "pattern with a line break": (edit_manifest(lambda d: d.update(pattern="x\nerror: ok {rank}{part}.safetensors")),
                                  "manifest field 'pattern' is 'x\\nerror: ok"),
    "config.json missing": (lambda d: (d / "config.json").unlink(), "config.json"),
    "nested too deeply": (lambda d: (d / "shardstate.json").write_text("[" * 100_000 + "]" * 100_000),
                          "manifest is not valid JSON (nested too deeply)"),
    "duplicate key": (lambda d: (d / "shardstate.json").write_text('{"format": "a", "format": "shardstate"}'),
                      "duplicate key 'format'"),
}


def damaged(state: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(state, copy)
    damage(copy)
    return copy


def one_error(capsys, *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err and err[-1].startswith("error: "), (code, err)
    assert not any("Traceback" in line or "internal error" in line for line in err), err
    return err[-1]


@pytest.mark.parametrize("case", CASES)
def test_a_lying_manifest_is_refused_by_generate_and_verify(state, other_state, tmp_path, capsys, case):
    damage, expected = CASES[case]
    bad = damaged(state, tmp_path, damage or file_from(other_state))
    load = one_error(capsys, "generate", str(bad), "--tp", "2", "--verify", "--prompt-ids", "1,2")
    assert expected in load
    check = one_error(capsys, "verify", str(bad))
    assert expected in check or "failed verification" in check, check


def test_verify_names_the_file_of_another_state(state, other_state, tmp_path, capsys):
    bad = damaged(state, tmp_path, file_from(other_state))
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {R1}: {R1} records state=" in out and f"ok  {R0}" in out


def test_inspect_of_a_huge_tp_size_is_one_line_in_bounded_time_and_memory(state, tmp_path):
    """It used to loop over 10**12 ranks, growing memory without bound."""
    bad = damaged(state, tmp_path, edit_manifest(lambda d: d.update(tp_size=10**12)))

    def two_gib() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    result = subprocess.run([str(BIN / "shardstate"), "inspect", str(bad)], capture_output=True, text=True,
                            timeout=60, preexec_fn=two_gib)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "manifest field 'tp_size' is 1000000000000" in result.stderr


def test_rank_files_record_their_state_rank_and_part(state):
    doc = json.loads((state / "shardstate.json").read_text())
    for name, record in doc["files"].items():
        meta = read_header(state / name).metadata
        assert meta == {"format": "pt", "writer": "shardstate", "state": doc["state_id"], "rank": str(record["rank"]),
                        "tp_size": "2", "part": str(record["part"])}


def as_version_1(doc: dict) -> dict:
    """A manifest as shardstate 0.1 (format version 1) wrote it: specs with a kind, joined on dim 0."""
    def spec_v1(spec: dict) -> dict:
        assert spec["join_dim"] == 0 and spec["experts"] == 0
        parts = [{k: v for k, v in p.items() if k != "box"} for p in spec["parts"]]
        kind = ("fused" if len(parts) > 1 else "vocab" if parts[0]["padded"] else
                "replicated" if parts[0]["chunks"] == 1 else "split")
        return {"kind": kind, "tp_size": spec["tp_size"], "parts": parts}

    tensors = {rank: {name: {**record, "spec": record["spec"] if record["spec"].get("kind") == "constant"
                             else spec_v1(record["spec"])} for name, record in records.items()}
               for rank, records in doc["tensors"].items()}
    return {**doc, "version": 1, "tensors": tensors}


def test_a_version_1_state_still_verifies_loads_and_reshards(state, tmp_path, capsys):
    old = tmp_path / "v1"
    shutil.copytree(state, old)
    doc = json.loads((old / "shardstate.json").read_text())
    assert doc["version"] == 2
    (old / "shardstate.json").write_text(json.dumps(as_version_1(doc)))
    assert main(["verify", str(old)]) == 0
    assert main(["inspect", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["format"] == "shardstate v1"
    convert(old, tmp_path / "from-v1", 1)
    convert(state, tmp_path / "from-v2", 1)
    for name in ("model-rank-0-part-0.safetensors",):
        a, b = read_header(tmp_path / "from-v1" / name), read_header(tmp_path / "from-v2" / name)
        assert a.tensors == b.tensors
        start = a.data_start
        assert (tmp_path / "from-v1" / name).read_bytes()[start:] == (tmp_path / "from-v2" / name).read_bytes()[start:]
    result = subprocess.run([BIN / "shardstate", "generate", str(old), "--tp", "2", "--prompt-ids", "1,2,3",
                             "--max-new-tokens", "4", "--json"], capture_output=True, text=True, check=False)
    reference = subprocess.run([BIN / "shardstate", "generate", str(state), "--tp", "2", "--prompt-ids", "1,2,3",
                                "--max-new-tokens", "4", "--json"], capture_output=True, text=True, check=False)
    assert result.returncode == reference.returncode == 0, result.stderr + reference.stderr
    assert json.loads(result.stdout)["outputs"] == json.loads(reference.stdout)["outputs"]
