"""Property test: mutated manifests of a real sharded state. `inspect` and `verify` (through the CLI's
main), the checks `generate` runs before it starts any worker (LLM's `check_before_workers`) and those
`upload` runs before its first request either accept the state or refuse it with one `error:` line: never
another exception, a hang or a huge allocation. And they agree: what load's checks refuse, verify
refuses; what verify passes, load's checks pass; what verify refuses, upload refuses before contacting
the store. The same for the directory's entries (a file removed, a FIFO, a link, a directory).
SHARDSTATE_FUZZ_EXAMPLES (default 300) sets the cases per strategy; the nightly-style run uses
10000."""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstate.cli import main
from shardstate.convert import convert
from shardstate.errors import ShardstateError
from shardstate.format.manifest import MANIFEST_NAME
from shardstate.loaders.sharded import check_before_workers
from shardstate.models import build_on_meta, load_config
from shardstate.parallel.distributed import TPGroup
from shardstate.store.model_dir import open_model_dir
from shardstate.store.upload import check_source, upload_state
from shardstate.synthetic import make_llama_checkpoint

EXAMPLES = int(os.environ.get("SHARDSTATE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SLOWEST_EXAMPLE_S = 20  # a hang detector, far above the ~0.05 s a case takes
MEMORY_GROWTH_LIMIT = 1 << 30

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
BIG_INTS = st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**32, 2**53 + 1, 10**12, 2**63, 10**30])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(a copy to mutate, the original manifest, the specs load checks against)."""
    root = tmp_path_factory.mktemp("fuzz-manifest")
    source = make_llama_checkpoint(root / "hf", seed=11, num_key_value_heads=2, tie_word_embeddings=False)
    convert(source, root / "state", 2, max_part_bytes=60_000)
    shutil.copytree(root / "state", root / "copy")
    doc = json.loads((root / "state" / MANIFEST_NAME).read_text())
    params = dict(build_on_meta(load_config(root / "state"), TPGroup(0, 2), torch.float32).named_parameters())
    return root / "copy", doc, {"params": params, "dtype": torch.float32}


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths(inner, (*prefix, index))
    return found


def at(doc: object, path: tuple) -> object:
    for key in path:
        doc = doc[key]
    return doc


NO_STORE = "cannot use the S3 endpoint"  # AWS_ENDPOINT_URL has no scheme: boto3 makes no client, sends nothing


@pytest.fixture(scope="module", autouse=True)
def unusable_store():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:1")
        patch.delenv("SHARDSTATE_S3_PART_MIB", raising=False)
        yield


def upload_outcome(directory: Path) -> int:
    """`upload` with a store it cannot reach: 0 if its checks passed (it went on to make its S3 client,
    which fails before any request), 1 if they refused the directory, in one line."""
    try:
        upload_state(directory, "s3://fuzz-bucket/state")
    except ShardstateError as exc:
        assert "\n" not in str(exc)
        return 0 if exc.what.startswith(NO_STORE) else 1
    raise AssertionError("upload went through without a store")


def refused(check: Callable[..., object], *args: object) -> int:
    """0 if `check(*args)` passes, 1 if it refuses in one line."""
    try:
        check(*args)
    except ShardstateError as exc:
        assert str(exc).count("\n") == 0
        return 1
    return 0


def run(world, capsys, text: str | bytes) -> None:
    """Write the manifest, run inspect, verify, load's and upload's checks; check each outcome: one error
    line at most from each command, and agreement."""
    directory, _, model = world
    (directory / MANIFEST_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.monotonic()
    outcomes = {}
    for command in ("inspect", "verify"):
        outcomes[command] = main([command, str(directory), "--json"])
        assert outcomes[command] in (0, 1)
    outcomes["upload"] = refused(check_source, directory)  # upload's checks (test_directory_entries: upload's)
    if outcomes["verify"]:
        assert outcomes["upload"] == 1, "upload's checks passed what verify refused"
    outcomes["load"] = refused(lambda: check_before_workers(open_model_dir(directory), model["params"],
                                                            model["dtype"], verify=True))
    if outcomes["load"]:
        assert outcomes["verify"] == 1, "load's checks refused what verify passed"
        assert outcomes["inspect"] == 1, "load's checks refused what inspect printed as fine"
    if outcomes["inspect"]:
        assert outcomes["verify"] == 1, "inspect refused what verify passed"
    if outcomes["verify"] == 0:
        assert outcomes["load"] == 0
    assert time.monotonic() - start < SLOWEST_EXAMPLE_S
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err) and len(err) <= 2, err  # inspect's, verify's


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MEMORY_GROWTH_LIMIT, f"peak memory grew by {grown / 1e6:.0f} MB while fuzzing manifests"


def test_an_opaque_entry_on_a_later_rank_only_is_refused_by_verify_as_by_load(world, capsys):
    """Found by test_field_values: a constant recorded as opaque (spec null) on rank 1 alone passed verify
    (which looked for opaque entries on rank 0 only) while load's checks refused it."""
    doc = copy.deepcopy(world[1])
    doc["tensors"]["1"]["model.layers.0.self_attn.attn._q_scale"]["spec"] = None
    run(world, capsys, json.dumps(doc))
    assert main(["verify", str(world[0])]) == 1
    assert "has no recorded layout" in capsys.readouterr().err


@FUZZ
@given(data=st.data())
def test_field_values(world, capsys, data):
    """Any value, of any type, in place of any field at any depth."""
    doc = copy.deepcopy(world[1])
    path = data.draw(st.sampled_from(paths(doc)[1:]))
    at(doc, path[:-1])[path[-1]] = data.draw(JSON_VALUES | BIG_INTS)
    run(world, capsys, json.dumps(doc))


@FUZZ
@given(data=st.data())
def test_structure(world, capsys, data):
    """Keys removed, added, renamed; entries duplicated or swapped: ranks, files, tensors."""
    doc = copy.deepcopy(world[1])
    containers = [p for p in paths(doc) if isinstance(at(doc, p), dict | list) and at(doc, p)]
    target = at(doc, data.draw(st.sampled_from(containers)))
    keys = list(target) if isinstance(target, dict) else list(range(len(target)))
    a, b = data.draw(st.sampled_from(keys)), data.draw(st.sampled_from(keys))
    action = data.draw(st.sampled_from(["remove", "add", "rename", "duplicate", "swap"]))
    if action == "remove":
        del target[a]
    elif action == "swap":
        target[a], target[b] = target[b], target[a]
    elif isinstance(target, list):
        target.append(copy.deepcopy(target[a]))
    elif action == "add":
        target[data.draw(st.text(max_size=12))] = data.draw(JSON_VALUES)
    else:  # rename, or duplicate under another name
        target[data.draw(st.sampled_from([*map(str, keys), "0", "1", "2", "model-rank-2-part-0.safetensors"]))] = (
            target.pop(a) if action == "rename" else copy.deepcopy(target[a]))
    run(world, capsys, json.dumps(doc))


@FUZZ
@given(data=st.data())
def test_sizes(world, capsys, data):
    """Huge counts and sizes: long lists, many files or tensors, deep nesting, giant numbers and strings."""
    doc = copy.deepcopy(world[1])
    kind = data.draw(st.sampled_from(["tp_size", "source", "side_files", "files", "shape", "nesting", "string"]))
    n = data.draw(st.integers(0, 70_000))
    if kind == "tp_size":
        doc["tp_size"] = data.draw(st.integers(-(2**64), 2**64))
    elif kind == "source":
        doc["source"] = [{"name": "model.safetensors", "size": 1}] * n
    elif kind == "side_files":
        doc["side_files"] = [f"f{i}.json" for i in range(n)]
    elif kind == "files":
        record = next(iter(doc["files"].values()))
        doc["files"].update({f"model-rank-0-part-{i + 9}.safetensors": {**record, "part": i + 9}
                             for i in range(min(n, 20_000))})
    elif kind == "shape":
        record = next(iter(doc["tensors"]["0"].values()))
        record[data.draw(st.sampled_from(["shape", "global_shape"]))] = [data.draw(BIG_INTS)] * data.draw(
            st.integers(0, 12))
    elif kind == "string":
        doc["architecture"] = "x" * n * 10
    text = json.dumps(doc)
    if kind == "nesting":
        text = text[:-1] + ', "deep": ' + "[" * n + "]" * n + "}"
    run(world, capsys, text)


@FUZZ
@given(data=st.data())
def test_bytes(world, capsys, data):
    """Bytes of the manifest's text flipped, cut or made invalid UTF-8."""
    blob = bytearray(json.dumps(world[1]).encode())
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(data.draw(st.integers(1, 6))):
        blob[rng.randrange(len(blob))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    run(world, capsys, bytes(blob))


ENTRY_CHANGES = ("removed", "fifo", "link-outside", "link-inside", "directory", "truncated")
ALWAYS_REFUSED = ("removed", "fifo", "link-outside", "directory")


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))  # some 20 entries x 6 changes
@given(data=st.data())
def test_directory_entries(world, capsys, data):
    """A listed file (rank file, side file, the manifest) removed, truncated, or replaced by a FIFO, a link
    to the same bytes outside the directory, a link to another listed file, a directory: upload refuses
    what verify refuses, and always one missing, not a regular file or leading outside, before any request
    and without opening a FIFO (which would hang)."""
    directory, doc, _ = world
    original = directory.parent / "state"
    shutil.copy2(original / MANIFEST_NAME, directory / MANIFEST_NAME)  # the other tests leave theirs
    names = [MANIFEST_NAME, *doc["side_files"], *doc["files"]]
    name, change = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(ENTRY_CHANGES))
    path = directory / name
    path.unlink()
    try:
        if change == "fifo":
            os.mkfifo(path)
        elif change == "link-outside":
            path.symlink_to(original / name)
        elif change == "link-inside":
            path.symlink_to(data.draw(st.sampled_from([n for n in names if n != name])))
        elif change == "directory":
            path.mkdir()
        elif change == "truncated":
            content = (original / name).read_bytes()
            path.write_bytes(content[: data.draw(st.integers(0, max(0, len(content) - 1)))])
        verify = main(["verify", str(directory), "--json"])
        upload = upload_outcome(directory)
        assert verify in (0, 1)
        if verify or change in ALWAYS_REFUSED:
            assert upload == 1, f"upload's checks passed {name} {change}"
        err = capsys.readouterr().err.strip().splitlines()
        assert all(line.startswith("error: ") for line in err) and len(err) <= 1, err
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif os.path.lexists(path):
            path.unlink()
        shutil.copy2(original / name, path)
