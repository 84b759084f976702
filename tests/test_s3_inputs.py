"""What a careless or hostile object store hands shardstate, against a real S3-compatible server (SeaweedFS
on 127.0.0.1): a side file too large to read whole, a broken config.json named by its s3:// location, a
checkpoint whose config names no dtype, temporaries of killed fetches on the node, and inspect reading
rank files' headers in place."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardstate.benchmark.seaweedfs import S3Server
from shardstate.convert import convert
from shardstate.runtime.llm import LLM
from shardstate.synthetic import make_llama_checkpoint
from test_s3 import BUCKET, PROMPT, error_line, generate, shardstate, uploaded


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_llama_checkpoint(tmp_path_factory.mktemp("inputs") / "src", seed=3, initializer_range=0.1,
                                 num_hidden_layers=2)


@pytest.fixture(scope="module")
def state(source) -> Path:
    convert(source, source.parent / "tp2", 2)
    return source.parent / "tp2"


def put_checkpoint(server: S3Server, directory: Path, prefix: str, config: dict | None = None) -> str:
    client = server.client()
    for path in directory.iterdir():
        body = json.dumps(config).encode() if config is not None and path.name == "config.json" else path.read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=body)
    return f"s3://{BUCKET}/{prefix}"


def test_a_side_file_too_large_to_read_whole_is_refused(server, state, tmp_path):
    url = uploaded(server, state, "big-side")
    side = json.loads((state / "shardstate.json").read_text())["side_files"][-1]
    server.client().put_object(Bucket=BUCKET, Key=f"big-side/{side}", Body=b" " * ((64 << 20) + 1))
    result = shardstate(server, "inspect", url, "--cache-dir", str(tmp_path / "cache"))
    assert f"{url}/{side} is over 64 MiB, the limit for a file read whole" in error_line(result)


def test_errors_about_an_s3_model_name_its_location(server, source, state, tmp_path):
    config = json.loads((source / "config.json").read_text())
    url = put_checkpoint(server, source, "bad-config", {**config, "num_key_value_heads": 3})
    cache = tmp_path / "cache"
    line = error_line(shardstate(server, "generate", url, *PROMPT, "--cache-dir", str(cache)))
    assert f"does not divide num_attention_heads=4 in {url}/config.json: repair config.json" in line, line
    assert str(cache) not in line
    url = uploaded(server, state, "f32-as-bf16")
    line = error_line(shardstate(server, "generate", url, "--tp", "2", "--dtype", "bfloat16", *PROMPT[:2],
                                 "--cache-dir", str(cache)))
    assert f"saved as F32, running BF16 in {url}:" in line and str(cache) not in line, line


def test_a_checkpoint_in_s3_whose_config_names_no_dtype(server, source, tmp_path, monkeypatch):
    """The dtype comes from the weights' headers, read as objects (it looked for local files before)."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    config = {k: v for k, v in json.loads((source / "config.json").read_text()).items()
              if k not in ("dtype", "torch_dtype")}
    url = put_checkpoint(server, source, "no-dtype", config)
    with LLM(url, tensor_parallel_size=1, cache_dir=tmp_path / "cache") as remote:
        assert remote._model_dtype == torch.float32
        theirs = remote.rank_state_dicts()[0]
    with LLM(source, tensor_parallel_size=1) as local:
        ours = local.rank_state_dicts()[0]
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


KILLED_FETCH = """
import os, signal, sys
from pathlib import Path
from shardstate.store.cache_files import temporary_name
path = Path(sys.argv[1]) / temporary_name("model-rank-0-part-0.safetensors")
path.write_bytes(b"half a download")
print(path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporaries_of_killed_fetches_are_removed_by_the_next_run(server, state, tmp_path):
    """A fetch SIGKILLed on this node cannot remove its temporary: the next run that opens the node cache
    does, whatever location it opens, and leaves a live fetch's alone."""
    url, cache = uploaded(server, state, "killed"), tmp_path / "cache"
    generate(server, url, cache)
    (directory,) = cache.iterdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_FETCH, str(directory)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    dead = Path(killed.stdout.strip())
    live = subprocess.Popen([sys.executable, "-c", KILLED_FETCH.replace("os.kill", "input(); os.kill"),
                             str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        alive = Path(live.stdout.readline().strip())
        assert dead.exists() and alive.exists()
        other = uploaded(server, state, "other-location")  # another location, the same node cache
        result = shardstate(server, "inspect", other, "--cache-dir", str(cache))
        assert result.returncode == 0, result.stderr
        assert not dead.exists() and alive.exists()
    finally:
        live.kill()
        live.wait()
    again = generate(server, url, cache)
    assert [r["bytes_fetched"] for r in again["load"]] == [0, 0]
    assert not [p.name for p in directory.iterdir() if ".fetch-" in p.name]


def test_inspect_reads_an_s3_states_headers_in_place(server, state, tmp_path):
    url, cache = uploaded(server, state, "inspected"), tmp_path / "cache"
    result = shardstate(server, "inspect", url, "--json", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["ok"] and all(f["problem"] is None for r in info["ranks"] for f in r["files"])
    (directory,) = cache.iterdir()
    assert not list(directory.glob("model-rank-*"))  # nothing but the manifest and side files fetched
    name = "model-rank-1-part-0.safetensors"
    other = make_llama_checkpoint(tmp_path / "other", seed=4, initializer_range=0.1, num_hidden_layers=2)
    convert(other, tmp_path / "foreign", 2)  # another state of the same shapes: the file's own record differs
    foreign = (tmp_path / "foreign" / name).read_bytes()
    assert len(foreign) == (state / name).stat().st_size
    server.client().put_object(Bucket=BUCKET, Key=f"inspected/{name}", Body=foreign)
    flagged = shardstate(server, "inspect", url, "--json", "--cache-dir", str(cache))
    assert "1 rank file(s) would be refused by a load" in error_line(flagged)
    assert json.loads(flagged.stdout)["ranks"][1]["files"][0]["problem"]


def test_json_objects_nested_past_the_parser_are_one_line(server, state):
    """A marker or manifest object nested 100,000 deep at the prefix (a RecursionError traceback before):
    upload refuses the prefix in one line, and nothing is sent."""
    from shardstate.store.upload import MARKER_NAME

    deep = b'{"state_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    client = server.client()
    for name in (MARKER_NAME, "shardstate.json"):
        prefix = f"nested-{name.strip('.')}"
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=deep)
        line = error_line(shardstate(server, "upload", str(state), f"s3://{BUCKET}/{prefix}"))
        assert f"s3://{BUCKET}/{prefix}" in line and "Traceback" not in line, line
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")["Contents"]
        assert [o["Key"] for o in listed] == [f"{prefix}/{name}"]
