"""Pipeline-parallel states on disk: `convert --pp` writes vLLM 0.32's PP files (its names, its layer split,
the embedding, norm and head where vLLM's model of the family has them), inspect/verify accept them, and
`convert` reshards between any (pp, tp) layouts byte for byte as a direct convert does. The reference
for the tensors is the PP=1 convert at the same TP (rank files read back with safetensors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import checkpoint_maker
from rank_files import assert_same_directory, rank_tensors, stage_tensors
from shardstate.convert import convert
from shardstate.state_info import inspect_state, verify_state
from test_families import FAMILIES

BIN = Path(sys.executable).parent
LAYOUT_FAMILIES = {**FAMILIES, "llama-tied-5": ("LlamaForCausalLM", {"tie_word_embeddings": True,
                                                                      "num_hidden_layers": 5})}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, LAYOUT_FAMILIES, seed=5)


def shardstate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, timeout=300, env=env)


def layers_of(tensors: dict) -> list[int]:
    return sorted({int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")})


def ends_of(tensors: dict) -> list[str]:
    return sorted(n for n in tensors if not n.startswith("model.layers."))


@pytest.mark.parametrize(("name", "pp", "tp", "layers", "ends"), [
    # Llama, tied, 5 layers at PP=2: vLLM splits [3, 2]; the first stage embeds, the last keeps the tied
    # head as `lm_head.weight` (the smaller key of the two names sharing its storage) and the norm
    ("llama-tied-5", 2, 2, [[0, 1, 2], [3, 4]],
     [["model.embed_tokens.weight"], ["lm_head.weight", "model.norm.weight"]]),
    ("llama-tied-5", 3, 1, [[0, 1], [2, 3], [4]],
     [["model.embed_tokens.weight"], [], ["lm_head.weight", "model.norm.weight"]]),
    # vLLM's Qwen2-MoE builds its embedding, norm and head on every stage: its files hold them on each
    ("qwen2-moe", 2, 1, [[0, 1], [2]],
     [["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]] * 2),
])
def test_convert_writes_vllms_pp_files(family_dir, tmp_path, name, pp, tp, layers, ends):
    out = tmp_path / "state"
    convert(family_dir(name), out, tp, pp_size=pp, show_progress=False)
    flat = tmp_path / "flat"
    convert(family_dir(name), flat, tp, show_progress=False)
    manifest = json.loads((out / "shardstate.json").read_text())
    assert (manifest["tp_size"], manifest["pp_size"]) == (tp, pp)
    assert manifest["pattern"] == "model-pp-{pp}-tp-{tp}-part-{part}.safetensors"
    for file_name, record in manifest["files"].items():
        assert file_name == f"model-pp-{record['pp']}-tp-{record['tp']}-part-{record['part']}.safetensors"
        assert record["rank"] == record["pp"] * tp + record["tp"]
    for stage in range(pp):
        for rank in range(tp):
            tensors, reference = stage_tensors(out, stage, rank), rank_tensors(flat, rank)
            assert layers_of(tensors) == layers[stage] and ends_of(tensors) == ends[stage]
            for key, tensor in tensors.items():  # a tied first stage's embedding is PP=1's lm_head.weight
                same = reference.get(key, reference.get("lm_head.weight"))
                assert same.dtype == tensor.dtype and same.equal(tensor), (stage, rank, key)
    info = inspect_state(out)
    assert info["ok"] and info["pp_size"] == pp
    assert [(r["pp"], r["tp"]) for r in info["ranks"]] == [(s, t) for s in range(pp) for t in range(tp)]
    assert all(check.ok for check in verify_state(out))


LAYOUTS = [  # (source layout, target layout, family, --quantize): (pp, tp) each
    ((1, 2), (2, 2), "llama-tied-5", None),
    ((2, 2), (1, 1), "llama-tied-5", None),
    ((2, 1), (3, 2), "qwen2-moe", None),
    ((1, 2), (2, 1), "mixtral", "int8"),
    ((2, 1), (1, 2), "qwen3-tied", "fp8"),
]


@pytest.mark.parametrize(("saved", "target", "name", "quantize"), LAYOUTS,
                         ids=[f"{c[2]}-{c[0]}to{c[1]}-{c[3]}" for c in LAYOUTS])
def test_convert_reshards_between_layouts_as_a_direct_convert(family_dir, tmp_path, saved, target, name, quantize):
    src = family_dir(name)
    convert(src, tmp_path / "saved", saved[1], pp_size=saved[0], quantize=quantize, show_progress=False)
    convert(tmp_path / "saved", tmp_path / "resharded", target[1], pp_size=target[0], show_progress=False)
    convert(src, tmp_path / "direct", target[1], pp_size=target[0], quantize=quantize, show_progress=False)
    assert_same_directory(tmp_path / "resharded", tmp_path / "direct")


def test_a_custom_partition_is_kept_and_read_from_the_manifest(family_dir, tmp_path):
    """VLLM_PP_LAYER_PARTITION decides the split when converting; reading the state back (a reshard) takes
    its split from the manifest, whatever the variable says then."""
    src = family_dir("llama-tied-5")
    env = {**os.environ, "VLLM_PP_LAYER_PARTITION": "1,4"}
    result = shardstate("convert", str(src), str(tmp_path / "custom"), "--tp", "1", "--pp", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert "at TP=1 PP=2" in result.stdout
    assert layers_of(stage_tensors(tmp_path / "custom", 0, 0)) == [0]
    convert(tmp_path / "custom", tmp_path / "flat", 1, show_progress=False)
    convert(src, tmp_path / "direct", 1, show_progress=False)
    assert_same_directory(tmp_path / "flat", tmp_path / "direct")


@pytest.mark.parametrize(("args", "partition", "expected"), [
    (["--pp", "6"], None, "PP size 6 is more than the model's 5 layers"),
    (["--pp", "2"], "2,2", "VLLM_PP_LAYER_PARTITION='2,2' does not give 2 stages of at least one layer adding up"),
    (["--pp", "2"], "2,x", "VLLM_PP_LAYER_PARTITION='2,x' is not comma-separated layer counts"),
    (["--pp", "0"], None, "argument --pp"),
])
def test_layouts_that_cannot_be_made_are_refused_in_one_line(family_dir, tmp_path, args, partition, expected):
    env = dict(os.environ)
    env.pop("VLLM_PP_LAYER_PARTITION", None)
    if partition is not None:
        env["VLLM_PP_LAYER_PARTITION"] = partition
    result = shardstate("convert", str(family_dir("llama-tied-5")), str(tmp_path / "out"), "--tp", "1", *args,
                        env=env)
    assert result.returncode in (1, 2) and expected in result.stderr, result.stderr
    if result.returncode == 1:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def edited(state: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(state, copy)
    doc = json.loads((copy / "shardstate.json").read_text())
    edit(doc)
    (copy / "shardstate.json").write_text(json.dumps(doc))
    return copy


def first_file(doc: dict) -> dict:
    return doc["files"]["model-pp-1-tp-0-part-0.safetensors"]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: first_file(d).update(pp=0), "says pp 0 tp 0, but rank 2 is pp 1 tp 0"),
    (lambda d: first_file(d).pop("tp"), "lacks ['tp']"),
    (lambda d: d.update(pattern="model-rank-{rank}-part-{part}.safetensors"),
     "not a file-name pattern with {pp}, {tp}"),
    (lambda d: d.update(pp_size=3), "has parts [] for rank 4"),
    (lambda d: d["tensors"].pop("3"), "has ranks ['0', '1', '2'], not 0..3"),
    (lambda d: d["files"]["model-pp-0-tp-0-part-0.safetensors"].update(rank=1),
     "says pp 0 tp 0, but rank 1 is pp 0 tp 1"),
], ids=["wrong-pp", "no-tp", "pp1-pattern", "more-stages", "rank-missing", "wrong-rank"])
def test_a_pp_manifest_that_lies_is_refused_in_one_line(family_dir, tmp_path, edit, expected):
    state = tmp_path / "state"
    convert(family_dir("llama-tied-5"), state, 2, pp_size=2, show_progress=False)
    result = shardstate("verify", str(edited(state, tmp_path, edit)))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
