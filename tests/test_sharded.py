"""convert -> sharded state on disk -> sharded load: the files hold exactly vLLM's rank-local tensors,
each rank reads only its own files, and the model equals the default load of the source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, transformers_greedy
from rank_files import assert_same_directory
from shardstate import LLM
from shardstate.convert import convert
from shardstate.format.safetensors_header import read_header
from test_loaders import assert_states_equal, expected_rank_state

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("tp", [1, 2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda tp: f"tp{tp}")
def test_convert_then_sharded_load_equals_default_load(checkpoints, tmp_path, tp):
    src = checkpoints["gqa_untied"]
    out = convert(src, tmp_path / "sharded", tp, max_part_bytes=60_000)
    sharded_dir = tmp_path / "sharded"
    manifest = json.loads((sharded_dir / "shardstate.json").read_text())
    assert manifest["tp_size"] == tp and sorted(manifest["files"]) == out.files
    for name, record in manifest["files"].items():
        data = (sharded_dir / name).read_bytes()
        assert (record["size"], record["crc32"]) == (len(data), zlib.crc32(data)), name
    for rank in range(tp):
        files = sorted(sharded_dir.glob(f"model-rank-{rank}-part-*.safetensors"))
        assert len(files) > 1  # the small part size rolled over
        on_disk: dict[str, torch.Tensor] = {}
        for file in files:
            part = load_file(file)  # the safetensors library's own reader
            assert part, f"{file.name} is empty"
            on_disk.update(part)
        scales = {k: on_disk.pop(k) for k in list(on_disk) if k.endswith("_scale")}
        assert len(scales) == 4 * 2 and all(v.dtype == torch.float32 and v.item() == 1.0 for v in scales.values())
        assert_states_equal(on_disk, expected_rank_state(src, tp, rank, torch.float32))

    # the references: the hand slices (which the default loader equals: test_loaders.py) and transformers' tokens
    with LLM(sharded_dir, tensor_parallel_size=tp, load_format="auto") as llm:
        states = llm.rank_state_dicts()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
        reports = llm.load_reports
    assert tokens == transformers_greedy(src, PROMPTS, 6)[0]
    for rank, state in enumerate(states):
        assert_states_equal(state, expected_rank_state(src, tp, rank, torch.float32))
    for report in reports:
        own = sorted(sharded_dir.glob(f"model-rank-{report.rank}-part-*.safetensors"))
        assert sorted(report.files) == [str(f) for f in own]
        scale_bytes = 4 * 4 * 2  # vLLM's four F32 scale constants per layer are not read: no parameter
        assert report.bytes_read == sum(f.stat().st_size for f in own) - scale_bytes


def shardstate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, timeout=300)


def assert_one_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.fixture(scope="module")
def sharded_tp2(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refusals") / "tp2"
    convert(checkpoints["gqa_untied"], out, 2)
    return out


def damaged(sharded_tp2: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(sharded_tp2, copy)
    damage(copy)
    return copy


def rewrite_rank0(edit):
    """Rewrite rank 0's file with its tensors edited, keeping its metadata (its record of state and rank)."""
    def damage(directory: Path) -> None:
        path = directory / "model-rank-0-part-0.safetensors"
        save_file(edit(load_file(path)), path, metadata=read_header(path).metadata)

    return damage


QKV = "model.layers.0.self_attn.qkv_proj.weight"


def rename_in_manifest(directory: Path, new_name: str) -> None:
    manifest = json.loads((directory / "shardstate.json").read_text())
    manifest["files"][new_name] = manifest["files"].pop("model-rank-0-part-0.safetensors")
    (directory / "shardstate.json").write_text(json.dumps(manifest))


def link_outside(directory: Path, name: str) -> None:
    outside = directory.parent / f"outside-{name}"
    (directory / name).rename(outside)
    (directory / name).symlink_to(outside)


def replace_with_fifo(path: Path) -> None:
    """A named pipe where a file should be: opening it for reading would block forever."""
    path.unlink()
    os.mkfifo(path)


def edit_config(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case,tp,damage,expected",
    [
        ("reshard, a saved rank's file missing", "1", lambda d: (d / "model-rank-1-part-0.safetensors").unlink(),
         "file model-rank-1"),
        ("reshard, a saved rank's file of another rank", "1", lambda d: shutil.copyfile(
            d / "model-rank-0-part-0.safetensors", d / "model-rank-1-part-0.safetensors"),
         "the file belongs to another state or rank"),
        ("missing rank file", "2", lambda d: (d / "model-rank-1-part-0.safetensors").unlink(), "file model-rank-1"),
        ("missing manifest", "2", lambda d: (d / "shardstate.json").unlink(), "no shardstate.json"),
        ("different config", "2", edit_config, "config.json differs"),
        ("wrong dtype", "2", None, "saved as F32, running BF16"),
        ("manifest names a file outside", "2", lambda d: rename_in_manifest(d, "../model-rank-0-part-0.safetensors"),
         "manifest field 'files' names '../model-rank-0-part-0.safetensors', not a plain file name inside"),
        ("manifest names an absolute path", "2", lambda d: rename_in_manifest(d, "/etc/passwd"),
         "manifest field 'files' names '/etc/passwd', not a plain file name inside the directory"),
        ("symlink outside", "2", lambda d: link_outside(d, "model-rank-1-part-0.safetensors"),
         "model-rank-1-part-0.safetensors leads outside the directory"),
        ("rank file is a FIFO", "2", lambda d: replace_with_fifo(d / "model-rank-1-part-0.safetensors"),
         "cannot read (not a regular file) in"),
        ("manifest is a FIFO", "2", lambda d: replace_with_fifo(d / "shardstate.json"), "not a regular file"),
        ("config is a FIFO", "2", lambda d: replace_with_fifo(d / "config.json"), "not a regular file"),
        ("partial manifest", "2", lambda d: (d / "shardstate.json").write_text('{"format": "shards'),
         "manifest is not valid JSON"),
        ("future manifest version", "2", lambda d: (d / "shardstate.json").write_text(
            json.dumps({**json.loads((d / "shardstate.json").read_text()), "version": 99})),
         "manifest version 99, this shardstate reads versions 1, 2"),
        ("extra key", "2", rewrite_rank0(lambda st: {**st, "model.extra.weight": torch.zeros(2)}),
         "unexpected tensor 'model.extra.weight'"),
        ("missing key", "2", rewrite_rank0(lambda st: {k: v for k, v in st.items() if k != QKV}),
         f"lacks tensor '{QKV}' (1 missing)"),
        ("wrong shape in file", "2", rewrite_rank0(lambda st: {**st, QKV: st[QKV][:-1].contiguous()}),
         f"tensor '{QKV}' is F32[63, 64], manifest says F32[64, 64]"),
        ("wrong dtype in file", "2", rewrite_rank0(lambda st: {**st, QKV: st[QKV].half()}),
         f"tensor '{QKV}' is F16[64, 64], manifest says F32[64, 64]"),
    ],
)
def test_sharded_load_refusals(sharded_tp2, tmp_path, case, tp, damage, expected):
    model_dir = damaged(sharded_tp2, tmp_path, damage) if damage else sharded_tp2
    extra = ["--dtype", "bfloat16"] if case == "wrong dtype" else []
    args = ["generate", str(model_dir), "--tp", tp, "--load-format", "sharded", "--prompt-ids", "1,2", *extra]
    result = shardstate(*args)
    assert_one_error(result, expected)


def test_convert_refuses_existing_output_without_force(checkpoints, sharded_tp2):
    before = sorted(p.name for p in sharded_tp2.iterdir())
    assert_one_error(shardstate("convert", str(checkpoints["gqa_untied"]), str(sharded_tp2), "--tp", "2"),
                     "is a sharded state already: pass --force to replace it")
    assert sorted(p.name for p in sharded_tp2.iterdir()) == before


def test_fifo_in_place_of_a_weight_file_is_refused_not_waited_on(checkpoints, sharded_tp2, tmp_path):
    source = tmp_path / "hf"
    shutil.copytree(checkpoints["gqa_untied"], source)
    replace_with_fifo(source / "model.safetensors")
    assert_one_error(shardstate("convert", str(source), str(tmp_path / "out"), "--tp", "2"),
                     "cannot read (not a regular file) in")
    assert not (tmp_path / "out").exists()
    state = damaged(sharded_tp2, tmp_path, lambda d: replace_with_fifo(d / "model-rank-0-part-0.safetensors"))
    result = shardstate("verify", str(state))
    assert result.returncode == 1 and "BAD model-rank-0-part-0.safetensors: " in result.stdout, result.stdout


@pytest.mark.parametrize("saved_tp,target_tp", [(4, 2), (2, 4), (1, 4), (4, 1)])
@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_reshard_equals_direct_convert(checkpoints, tmp_path, name, saved_tp, target_tp):
    """Resharding never sees the HF checkpoint, yet writes a byte-identical directory (vocab padding,
    fused qkv/gate_up and replicated kv heads merged and split again; the state keeps its checkpoint's
    `source`, so its id too)."""
    src = checkpoints[name]
    saved = tmp_path / f"tp{saved_tp}"
    convert(src, saved, saved_tp, max_part_bytes=70_000)
    resharded = convert(saved, tmp_path / "resharded", target_tp, max_part_bytes=70_000)
    direct = convert(src, tmp_path / "direct", target_tp, max_part_bytes=70_000)
    assert resharded.files == direct.files
    assert_same_directory(tmp_path / "resharded", tmp_path / "direct")
    manifest = json.loads((tmp_path / "resharded" / "shardstate.json").read_text())
    assert manifest["tp_size"] == target_tp
    assert sorted(s["name"] for s in manifest["source"]) == sorted(p.name for p in src.glob("*.safetensors"))


@pytest.mark.parametrize("tp", [1, 2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda tp: f"tp{tp}")
def test_save_from_live_workers_equals_convert(checkpoints, tmp_path, tp):
    """The vLLM PR #4690 flow (load, then every rank dumps its live state) writes a byte-identical
    directory to the offline converter's, and the saved directory loads back to the same model."""
    src = checkpoints["mha_tied"]
    saved, direct = tmp_path / "saved", tmp_path / "direct"
    with LLM(src, tensor_parallel_size=tp, load_format="sliced") as llm:
        files = llm.save_sharded_state(saved, max_size=60_000)
        live_states = llm.rank_state_dicts()
        live_tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    assert files == convert(src, direct, tp, max_part_bytes=60_000).files
    assert_same_directory(saved, direct)
    if tp == 4:  # a 4-rank reload adds no case: tied states reload at TP=1 and 2 here, TP=4 states load above
        return
    with LLM(saved, tensor_parallel_size=tp) as llm:
        assert llm.load_reports[0].files[0].startswith(str(saved / "model-rank-0-part-"))
        for state, live in zip(llm.rank_state_dicts(), live_states, strict=True):
            assert_states_equal(state, live)
        assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)] == live_tokens


def test_save_cli(checkpoints, tmp_path):
    result = shardstate("save", str(checkpoints["gqa_untied"]), str(tmp_path / "out"), "--tp", "2")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "shardstate.json").read_text())
    assert sorted(manifest["files"]) == ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_inspect_and_verify(sharded_tp2, tmp_path):
    info = json.loads(shardstate("inspect", str(sharded_tp2), "--json").stdout)
    assert (info["tp_size"], info["architecture"], info["dtype"]) == (2, "LlamaForCausalLM", "F32")
    assert [r["files"][0]["name"] for r in info["ranks"]] == [f"model-rank-{r}-part-0.safetensors" for r in (0, 1)]
    assert info["total_bytes"] == sum(f.stat().st_size for f in sharded_tp2.glob("*.safetensors"))
    clean = shardstate("verify", str(sharded_tp2), "--json")
    assert clean.returncode == 0 and json.loads(clean.stdout)["ok"] is True

    def flip_byte(directory: Path) -> None:
        path = directory / "model-rank-1-part-0.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))

    bad = damaged(sharded_tp2, tmp_path, flip_byte)
    result = shardstate("verify", str(bad), "--json")
    assert result.returncode == 1
    files = {f["name"]: f for f in json.loads(result.stdout)["files"]}
    assert files["model-rank-0-part-0.safetensors"]["ok"] is True
    assert "checksum" in files["model-rank-1-part-0.safetensors"]["problem"]
    assert_one_error(result, "1 of 2 files failed verification (model-rank-1-part-0.safetensors)")


def strip_to_vllm_layout(directory: Path) -> None:
    """What vLLM's save_sharded_state leaves: the rank files with no shardstate metadata, no manifest."""
    (directory / "shardstate.json").unlink()
    for path in directory.glob("model-rank-*.safetensors"):
        save_file(load_file(path), path)


def test_vllm_layout_without_manifest_loads_at_its_tp_with_a_warning(checkpoints, sharded_tp2, tmp_path):
    legacy = damaged(sharded_tp2, tmp_path, strip_to_vllm_layout)
    args = ["--prompt-ids", "1,5,9,33,7,120", "--max-new-tokens", "5", "--ignore-eos", "--json"]
    result = shardstate("generate", str(legacy), "--tp", "2", *args)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "integrity cannot be checked" in result.stderr
    reference = shardstate("generate", str(checkpoints["gqa_untied"]), "--tp", "2", *args)
    assert json.loads(result.stdout)["outputs"] == json.loads(reference.stdout)["outputs"]
    assert_one_error(shardstate("generate", str(legacy), "--tp", "1", *args), "saved for TP=2, running TP=1")
    # and it can be resharded into a verified sharded state
    assert shardstate("convert", str(legacy), str(tmp_path / "tp1"), "--tp", "1").returncode == 0
    assert shardstate("verify", str(tmp_path / "tp1")).returncode == 0


def test_verify_on_load_names_file_and_tensor_of_a_flipped_byte(sharded_tp2, tmp_path):
    args = ["--tp", "2", "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    assert shardstate("generate", str(sharded_tp2), "--verify", *args).returncode == 0
    manifest = json.loads((sharded_tp2 / "shardstate.json").read_text())
    target = "model.layers.1.mlp.down_proj.weight"
    file = manifest["tensors"]["1"][target]["file"]
    header = read_header(sharded_tp2 / file)

    def flip(directory: Path) -> None:
        path = directory / file
        data = bytearray(path.read_bytes())
        data[header.tensors[target].begin + 5] ^= 0x01
        path.write_bytes(bytes(data))

    bad = damaged(sharded_tp2, tmp_path, flip)
    for io in (["read"], ["read", "--io-threads", "2"], ["mmap"], ["direct"]):
        result = shardstate("generate", str(bad), "--verify", "--io", *io, *args)
        if io == ["direct"] and "direct read failed" in result.stderr:
            continue  # a filesystem without O_DIRECT (tmpfs)
        assert_one_error(result, f"tensor '{target}' does not match its checksum in {bad / file}")
    assert shardstate("generate", str(bad), *args).returncode == 0  # unchecked, it would load silently


def test_tied_weight_is_saved_as_vllm_names_it_and_earlier_states_still_load(checkpoints, tmp_path):
    """vLLM keeps a tied embedding as `lm_head.weight` (and its sharded_state loader asks for it); states
    written before under `model.embed_tokens.weight` load, verify and reshard to the same model."""
    src = checkpoints["mha_tied"]
    state, earlier = tmp_path / "tp2", tmp_path / "earlier"
    convert(src, state, 2)
    doc = json.loads((state / "shardstate.json").read_text())
    for records in doc["tensors"].values():
        assert "lm_head.weight" in records and "model.embed_tokens.weight" not in records
    shutil.copytree(state, earlier)
    for name, record in doc["files"].items():
        tensors = load_file(earlier / name)
        if "lm_head.weight" in tensors:
            tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
            save_file(tensors, earlier / name, metadata=read_header(state / name).metadata)
            data = (earlier / name).read_bytes()
            record.update(size=len(data), crc32=zlib.crc32(data))
    for records in doc["tensors"].values():
        records["model.embed_tokens.weight"] = records.pop("lm_head.weight")
    (earlier / "shardstate.json").write_text(json.dumps(doc))
    tokens = {}
    for directory in (state, earlier):
        with LLM(directory, tensor_parallel_size=2, verify=True) as llm:
            tokens[directory] = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    assert tokens[earlier] == tokens[state]
    assert shardstate("verify", str(earlier)).returncode == 0
    convert(earlier, tmp_path / "tp1", 1)
    convert(src, tmp_path / "direct", 1)
    assert_same_directory(tmp_path / "tp1", tmp_path / "direct")


@pytest.mark.parametrize("load_format", ["default", "sliced"])
def test_hf_load_formats_on_a_sharded_state_say_which_to_use(sharded_tp2, load_format):
    result = shardstate("generate", str(sharded_tp2), "--tp", "2", "--load-format", load_format, "--prompt-ids", "1")
    assert_one_error(result, f"--load-format {load_format} reads Hugging Face checkpoints; this is a sharded state")
    assert "use --load-format sharded (or auto)" in result.stderr
