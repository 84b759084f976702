"""The vLLM plugin's cache without vLLM: options, keys, entries filled by real gloo ranks and read back, races,
damage, opaque entries and `shardstate cache`. (vLLM itself drives the same code in test_vllm_plugin.py.)

The reference for an entry's bytes is `shardstate convert` of the same checkpoint: filled from the tensors
a TP rank holds, an entry must be that very state, manifest and rank files byte for byte."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from shardstate.convert import convert
from shardstate.errors import ShardstateError
from shardstate.format.manifest import MANIFEST_NAME
from shardstate.format.safetensors_header import read_header
from shardstate.format.sharded_state import open_sharded_state
from shardstate.models import build_on_meta, load_config
from shardstate.parallel.distributed import TPGroup
from shardstate.store.cache import CacheEntry, EntryLock, entry_name
from shardstate.synthetic import make_checkpoint
from shardstate.vllm.fill import Checkpoint, fill_entry
from shardstate.vllm.key import key_fields
from shardstate.vllm.options import LoaderOptions, parse_options
from shardstate.vllm.ranks import Ranks
from shardstate.vllm.state_reader import read_rank

BIN = Path(sys.executable).parent
TP = 2
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 203, "num_hidden_layers": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """A tied Llama checkpoint and its `shardstate convert --tp 2` (the reference entry)."""
    root = tmp_path_factory.mktemp("vllm-cache")
    hf = make_checkpoint(root / "hf", "LlamaForCausalLM", seed=5, **SMALL)
    convert(hf, root / "converted", TP)
    return hf, root / "converted"


def rank_tensors(state: Path, rank: int) -> dict[str, torch.Tensor]:
    """What a TP rank's parameters hold (as vLLM's state dict would), in the files' order."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(state.glob(f"model-rank-{rank}-part-*.safetensors")):
        header = read_header(path)
        data = path.read_bytes()
        for name, entry in sorted(header.tensors.items(), key=lambda item: item[1].begin):
            raw = bytearray(data[entry.begin : entry.end])  # offsets in the file
            out[name] = torch.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape) if raw else \
                torch.empty(entry.shape, dtype=entry.dtype)
    return out


def fields_of(hf: Path, tp: int = TP) -> dict:
    return key_fields(hf, architecture="LlamaForCausalLM", dtype="F32", quantization=None, tp_size=tp, pp_size=1,
                      vllm_version="test", role="target", format_version=2, overrides={})


def checkpoint_of(hf: Path, tp: int = TP) -> Checkpoint:
    specs = build_on_meta(load_config(hf), TPGroup(0, tp), torch.float32).shard_specs()
    return Checkpoint(hf, "LlamaForCausalLM", torch.float32, specs)


def _fill_rank(rank: int, size: int, rendezvous: str, cache: str, hf: str, state: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        entry = CacheEntry(Path(cache.format(rank=rank)), entry_name(fields_of(Path(hf))))
        lines: list[str] = []
        done = fill_entry(entry, fields_of(Path(hf)), rank_tensors(Path(state), rank), Ranks.of(),
                          checkpoint_of(Path(hf)), lines.append)
        queue.put((rank, done, lines))
    except BaseException as exc:
        queue.put((rank, False, [repr(exc)]))
        raise
    finally:
        torch.distributed.destroy_process_group()


def fill_with_ranks(cache: Path | str, hf: Path, state: Path, tmp: Path) -> list[tuple[int, bool, list[str]]]:
    """Each rank in a process of its own, in one gloo group; `cache` may name each rank's own directory
    ({rank}: as node-local caches on different nodes)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_fill_rank, args=(r, TP, str(tmp / "rdzv"), str(cache), str(hf), str(state),
                                                      queue)) for r in range(TP)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


@pytest.fixture(scope="module")
def filled(source, tmp_path_factory) -> Path:
    """An entry filled by two real gloo ranks from what they hold."""
    hf, state = source
    tmp = tmp_path_factory.mktemp("filled")
    results = fill_with_ranks(tmp / "cache", hf, state, tmp)
    assert [(r, done) for r, done, _ in results] == [(0, True), (1, True)], results
    return only_entry_in(tmp / "cache")


def test_entry_is_the_converted_state_byte_for_byte(filled, source):
    _, state = source
    assert json.loads((filled / MANIFEST_NAME).read_text()) == json.loads((state / MANIFEST_NAME).read_text())
    for path in sorted(state.iterdir()):
        assert (filled / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in filled.iterdir()) == sorted([*(p.name for p in state.iterdir()), "key.json"])
    leftovers = [p.name for p in filled.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_node_local_caches_each_hold_their_own_ranks(source, tmp_path):
    """Ranks that do not share a cache directory (other nodes): each directory gets its own complete entry
    of the ranks that see it, with the manifest of the whole state."""
    hf, state = source
    results = fill_with_ranks(str(tmp_path / "node-{rank}"), hf, state, tmp_path)
    assert [(r, done) for r, done, _ in results] == [(0, True), (1, True)], results
    for rank in range(TP):
        entry = only_entry_in(tmp_path / f"node-{rank}")
        assert sorted(p.name for p in entry.glob("*.safetensors")) == [f"model-rank-{rank}-part-0.safetensors"]
        assert json.loads((entry / "key.json").read_text())["ranks"] == [rank]
        assert (entry / MANIFEST_NAME).read_bytes() == (state / MANIFEST_NAME).read_bytes()
        expected = rank_tensors(state, rank)
        params = {name: torch.zeros_like(t) for name, t in expected.items()}
        read_rank(open_sharded_state(entry), rank, params, verify=True)
        assert all(torch.equal(params[n], expected[n]) for n in expected)
    listed = subprocess.run([BIN / "shardstate", "cache", "list", "--json", "--cache-dir", tmp_path / "node-1"],
                            capture_output=True, text=True, timeout=120)
    (info,) = json.loads(listed.stdout)["entries"]
    assert info["complete"] and info["ranks"] == [1]


def only_entry_in(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def test_entry_reads_back_into_fresh_parameters(filled, source):
    _, state = source
    for rank in range(TP):
        expected = rank_tensors(state, rank)
        params = {name: torch.full_like(t, 7) for name, t in expected.items()}
        report = read_rank(open_sharded_state(filled), rank, params, verify=True)
        assert all(torch.equal(params[n].reshape(-1).view(torch.uint8), expected[n].reshape(-1).view(torch.uint8))
                   for n in expected)
        assert report.bytes_read == (filled / f"model-rank-{rank}-part-0.safetensors").stat().st_size


def test_shardstate_cache_list_verify_rm(filled, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(filled.parent, cache)
    run = lambda *args: subprocess.run([BIN / "shardstate", "cache", *args, "--cache-dir", cache],  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    listed = run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    (info,) = json.loads(listed.stdout)["entries"]
    assert info["name"] == filled.name and info["complete"] and info["ranks"] == [0, 1]
    assert info["fields"]["tp_size"] == TP and info["fields"]["architecture"] == "LlamaForCausalLM"
    assert run("verify").returncode == 0
    (cache / "foreign").mkdir()
    (cache / "foreign" / "weights.bin").write_bytes(b"mine")
    refused = run("rm", "foreign")
    assert refused.returncode == 1 and refused.stderr.startswith("error: not a cache entry shardstate wrote")
    assert (cache / "foreign" / "weights.bin").exists()
    (cache / "linked").symlink_to(cache / filled.name)
    assert run("rm", "linked").returncode == 1 and (cache / filled.name).exists()
    damaged = cache / filled.name / "model-rank-1-part-0.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 1
    damaged.write_bytes(bytes(data))
    verified = run("verify", "--json")
    assert verified.returncode == 1 and "error: 1 file(s) failed verification" in verified.stderr
    files = json.loads(verified.stdout)["entries"][0]["files"]
    assert [f["ok"] for f in files] == [True, False]
    removed = run("rm", "--all")
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["foreign", "linked"]


def test_a_flipped_byte_is_found_while_reading_and_the_entry_rebuilt(filled, source, tmp_path):
    hf, state = source
    cache = tmp_path / "cache"
    shutil.copytree(filled.parent, cache)
    entry = CacheEntry(cache, filled.name)
    damaged = entry.path / "model-rank-0-part-0.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    params = {name: torch.zeros_like(t) for name, t in rank_tensors(state, 0).items()}
    with pytest.raises(ShardstateError, match="does not match its checksum"):
        read_rank(open_sharded_state(entry.path), 0, params, verify=True)
    kept: list[str] = []
    assert not fill_entry(entry, fields_of(hf), rank_tensors(state, 0), Ranks(0, 1), checkpoint_of(hf, 1),
                          kept.append)  # the same fields, published: kept unless told to replace
    assert "meanwhile; kept" in kept[0]
    fields = fields_of(hf, 1)
    entry1 = CacheEntry(cache, entry_name(fields))
    tensors = rank_tensors_at_tp1(hf, tmp_path)
    assert fill_entry(entry1, fields, tensors, Ranks(0, 1), checkpoint_of(hf, 1), kept.append)
    (entry1.path / "model-rank-0-part-0.safetensors").write_bytes(b"\0" * 16)
    assert fill_entry(entry1, fields, tensors, Ranks(0, 1), checkpoint_of(hf, 1), kept.append, replace=True)
    params = {name: torch.zeros_like(t) for name, t in tensors.items()}
    read_rank(open_sharded_state(entry1.path), 0, params, verify=True)
    assert all(torch.equal(params[n], tensors[n]) for n in tensors)


def rank_tensors_at_tp1(hf: Path, tmp: Path) -> dict[str, torch.Tensor]:
    convert(hf, tmp / "tp1", 1)
    return rank_tensors(tmp / "tp1", 0)


def test_a_held_lock_means_no_fill_and_nothing_left(source, tmp_path):
    hf, _ = source
    fields = fields_of(hf, 1)
    entry = CacheEntry(tmp_path, entry_name(fields))
    other = EntryLock(entry)
    assert other.acquire()
    lines: list[str] = []
    tensors = rank_tensors_at_tp1(hf, tmp_path / "src")
    assert not fill_entry(entry, fields, tensors, Ranks(0, 1), checkpoint_of(hf, 1), lines.append)
    assert "another process is building" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.lock_path.name, "src"]
    other.release()
    assert fill_entry(entry, fields, tensors, Ranks(0, 1), checkpoint_of(hf, 1), lines.append)


def _race(cache: str, hf: str, state: str, barrier, queue) -> None:
    fields = fields_of(Path(hf), 1)
    lines: list[str] = []
    barrier.wait()
    done = fill_entry(CacheEntry(Path(cache), entry_name(fields)), fields, rank_tensors(Path(state), 0), Ranks(0, 1),
                      checkpoint_of(Path(hf), 1), lines.append)
    queue.put((done, lines))


def test_two_servers_filling_at_once_leave_one_whole_entry(source, tmp_path):
    hf, _ = source
    convert(hf, tmp_path / "tp1", 1)
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_race, args=(str(tmp_path / "cache"), str(hf), str(tmp_path / "tp1"), barrier,
                                                 queue)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sorted(done for done, _ in outcomes) == [False, True], outcomes
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".building-" in p.name] == []
    verified = subprocess.run([BIN / "shardstate", "verify", entries[0]], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stderr


def test_an_opaque_entry_loads_by_name_and_is_never_resharded(source, tmp_path):
    """A model shardstate has no specs for: its tensors recorded without a layout (spec null)."""
    hf, _ = source
    tensors = {"encoder.blocks.0.weight": torch.randn(3, 5), "encoder.scale": torch.ones(()),
               "head.weight": torch.randn(7, 3).to(torch.bfloat16)}
    fields = {**fields_of(hf, 1), "architecture": "SomethingNewForCausalLM"}
    entry = CacheEntry(tmp_path, entry_name(fields))
    opaque = Checkpoint(hf, "SomethingNewForCausalLM", torch.float32, None)
    assert fill_entry(entry, fields, tensors, Ranks(0, 1), opaque, print)
    records = json.loads((entry.path / MANIFEST_NAME).read_text())["tensors"]["0"]
    assert records["encoder.blocks.0.weight"]["spec"] is None and records["head.weight"]["dtype"] == "BF16"
    params = {name: torch.zeros_like(t) for name, t in tensors.items()}
    read_rank(open_sharded_state(entry.path), 0, params, verify=True)
    assert all(torch.equal(params[n], tensors[n]) for n in tensors)
    refused = subprocess.run([BIN / "shardstate", "inspect", entry.path], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "error: " in refused.stderr, refused.stderr


def test_options_are_checked_in_one_line():
    assert parse_options(None) == LoaderOptions()
    assert parse_options({"cache": "off", "verify": False}).cache == "off"
    for bad, said in [({"cache_dirr": "x"}, "unknown option 'cache_dirr'"), ({"verify": "yes"}, "option verify"),
                      ({"cache": "sometimes"}, "option cache"), ({"state": 3}, "option state"),
                      ([1], "not a JSON object"), ({"state": "/s", "cache": "refresh"}, "state and cache=refresh")]:
        with pytest.raises(ShardstateError, match=said) as caught:
            parse_options(bad)
        assert "\n" not in str(caught.value)


def test_the_key_changes_with_what_changes_a_ranks_bytes(source, tmp_path):
    hf, _ = source
    copy = tmp_path / "hf"
    shutil.copytree(hf, copy)
    base = entry_name(fields_of(copy))
    assert entry_name(fields_of(copy)) == base  # nothing read changes it
    assert entry_name(fields_of(copy, tp=1)) != base
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    edited = entry_name(fields_of(copy))
    assert edited != base
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # replaced by another file
    assert entry_name(fields_of(copy)) not in (base, edited)


def test_a_hugging_face_cache_is_known_by_its_blob_names(source, tmp_path):
    hf, _ = source
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abcd"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for path in hf.iterdir():
        blob = blobs / (("a" * 63 + "1") if path.suffix == ".safetensors" else path.name)
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(blob)
    files = {r["name"]: r for r in fields_of(snapshot)["checkpoint"]["files"]}
    size = (hf / "model.safetensors").stat().st_size
    assert files["model.safetensors"] == {"name": "model.safetensors", "size": size, "blob": "a" * 63 + "1"}


def test_importing_shardstate_does_not_import_vllm_and_the_plugin_is_declared():
    code = ("import sys, shardstate, shardstate.vllm, shardstate.vllm.plugin, shardstate.vllm.fill, "
            "shardstate.cli; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "shardstate"]
    assert plugin.value == "shardstate.vllm.plugin:register"
