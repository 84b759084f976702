"""Sharded states and Hugging Face checkpoints in object storage, against a real S3-compatible server
(SeaweedFS on 127.0.0.1, started and stopped here): `upload`, then `generate s3://...` where each rank
fetches only its own rank files into the node cache, checked against the manifest; a second load fetches
nothing; a HF checkpoint read in place by the sliced and default loaders and by convert; every failure (a
changed, truncated or missing object, refused credentials, no server, the server dying mid-download) is
one line, and leaves nothing half-written in the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import S3_BUCKET
from rank_files import rank_tensors
from shardstate.benchmark.seaweedfs import S3Server, s3_server
from shardstate.convert import convert
from shardstate.errors import ShardstateError
from shardstate.format.sharded_state import VLLM_SCALES
from shardstate.io.s3 import S3Location, store_for
from shardstate.runtime.llm import LLM
from shardstate.store.model_dir import open_model_dir
from shardstate.store.remote import cache_directory
from shardstate.synthetic import make_llama_checkpoint
from test_worker_failures import processes_with_env

BIN = Path(sys.executable).parent
BUCKET = S3_BUCKET
PROMPT = ["--prompt-ids", "1,5,9,33", "--max-new-tokens", "5", "--ignore-eos"]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    src = make_llama_checkpoint(tmp_path_factory.mktemp("s3") / "src", seed=5, initializer_range=0.1,
                                num_hidden_layers=3)
    out = src.parent / "tp2"
    convert(src, out, 2, max_part_bytes=4096)  # many parts per rank, the last ones holding only constants
    tensors_of: dict[str, list[str]] = {}
    for tensors in json.loads((out / "shardstate.json").read_text())["tensors"].values():
        for key, record in tensors.items():
            tensors_of.setdefault(record["file"], []).append(key)
    assert any(all(key.endswith(VLLM_SCALES) for key in keys) for keys in tensors_of.values())
    return out


def shardstate(server: S3Server, *args: str, secret: str | None = None, timeout: float = 180,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(server.env() if secret is None else server.env(secret)), **(env or {})}
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def uploaded(server: S3Server, state: Path, prefix: str) -> str:
    url = f"s3://{BUCKET}/{prefix}"
    result = shardstate(server, "upload", str(state), url)
    assert result.returncode == 0, result.stderr
    return url


def generate(server: S3Server, model: str, cache: Path, *extra: str) -> dict:
    result = shardstate(server, "generate", model, "--tp", "2", *PROMPT, "--json", "--cache-dir", str(cache), *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    return result.stderr


def rank_sizes(state: Path) -> dict[int, int]:
    manifest = json.loads((state / "shardstate.json").read_text())
    sizes: dict[int, int] = {}
    for record in manifest["files"].values():
        sizes[record["rank"]] = sizes.get(record["rank"], 0) + record["size"]
    return sizes


def test_each_rank_fetches_only_its_own_files_once(server, state, tmp_path):
    url = uploaded(server, state, "llama")
    local = generate(server, str(state), tmp_path / "unused")
    remote = generate(server, url, tmp_path / "cache")
    assert [o["token_ids"] for o in remote["outputs"]] == [o["token_ids"] for o in local["outputs"]]
    sizes = rank_sizes(state)
    assert [r["bytes_fetched"] for r in remote["load"]] == [sizes[0], sizes[1]]
    assert all(r["cached_files"] == [] and len(r["fetched_files"]) >= 2 for r in remote["load"])
    assert all(r["bytes_prefaulted"] >= sizes[r["rank"]] for r in remote["load"])  # read into memory reserved at start
    (cached,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == sorted([".shardstate-cache", *(p.name for p in state.iterdir())])
    again = generate(server, url, tmp_path / "cache")
    assert [r["bytes_fetched"] for r in again["load"]] == [0, 0]
    assert all(r["fetched_files"] == [] and len(r["cached_files"]) >= 2 for r in again["load"])
    assert [o["token_ids"] for o in again["outputs"]] == [o["token_ids"] for o in local["outputs"]]
    # a cached file that no longer matches the manifest is fetched again, not used
    damaged = sorted(cached.glob("model-rank-1-part-*.safetensors"))[-1]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    repaired = generate(server, url, tmp_path / "cache")
    assert repaired["load"][0]["bytes_fetched"] == 0
    assert repaired["load"][1]["fetched_files"] == [damaged.name]
    assert [o["token_ids"] for o in repaired["outputs"]] == [o["token_ids"] for o in local["outputs"]]
    assert damaged.read_bytes() == (state / damaged.name).read_bytes()  # and written back whole before exit
    inspected = shardstate(server, "inspect", url, "--json", "--cache-dir", str(tmp_path / "cache"))
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["tp_size"] == 2, inspected.stderr
    verified = shardstate(server, "verify", url, "--json", "--cache-dir", str(tmp_path / "fresh"))
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stderr  # every rank fetched


def test_a_hf_checkpoint_in_s3_loads_sliced_and_default_and_converts(server, tmp_path, monkeypatch):
    """Weight objects read in place (no copy in the cache): the sliced loader's ranks read only the extents of
    their slices, the default loader's every byte; both give exactly the local load's weights, and `convert`
    from the s3:// checkpoint writes exactly what it writes from the local one."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    src = make_llama_checkpoint(tmp_path / "hf", seed=7, initializer_range=0.1, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    client = server.client()
    for path in src.iterdir():
        client.upload_file(str(path), BUCKET, f"hf/{path.name}")
    url, cache = f"s3://{BUCKET}/hf", tmp_path / "cache"
    weight_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    with LLM(src, tensor_parallel_size=2, load_format="default") as local:
        expected = local.rank_state_dicts()
    for load_format in ("sliced", "default"):
        with LLM(url, tensor_parallel_size=2, load_format=load_format, cache_dir=cache) as remote:
            for theirs, ours in zip(expected, remote.rank_state_dicts(), strict=True):
                assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
            read = [report.bytes_read for report in remote.load_reports]
        if load_format == "sliced":
            assert all(n < 0.8 * weight_bytes for n in read), (read, weight_bytes)
        else:
            assert all(n >= weight_bytes - 100_000 for n in read), (read, weight_bytes)  # every tensor, not headers
    (cached,) = cache.iterdir()
    assert not list(cached.glob("*.safetensors"))  # read in place, never copied
    convert(url, tmp_path / "from-s3", 2, cache_dir=cache)
    convert(src, tmp_path / "from-disk", 2)
    for rank in range(2):
        theirs, ours = rank_tensors(tmp_path / "from-disk", rank), rank_tensors(tmp_path / "from-s3", rank)
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    manifests = [json.loads((tmp_path / d / "shardstate.json").read_text()) for d in ("from-disk", "from-s3")]
    assert manifests[0]["source"] == manifests[1]["source"]
    # every ranged GET asks for the version listed when the load began: a replaced object is refused
    name = sorted(p.name for p in src.glob("*.safetensors"))[0]
    store, data = store_for(S3Location.parse(url)), (src / name).read_bytes()
    listed = store.objects()[name]
    client.put_object(Bucket=BUCKET, Key=f"hf/{name}", Body=data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ShardstateError, match=f"{url}/{name} changed while it was read"):
        store.read_into(name, 0, memoryview(bytearray(100)), listed)
    # the cache directory is shardstate's own: one it did not make is refused, not written into
    foreign = cache_directory(S3Location.parse(url), tmp_path / "foreign")
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ShardstateError, match="not a directory shardstate made for its cache"):
        open_model_dir(url, tmp_path / "foreign")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    client.put_object(Bucket=BUCKET, Key="config-only/config.json", Body=(src / "config.json").read_bytes())
    lone = shardstate(server, "generate", f"s3://{BUCKET}/config-only", *PROMPT, "--cache-dir", str(cache))
    assert "holds no shardstate.json and no *.safetensors weight files" in error_line(lone)


def test_upload_refuses_a_prefix_that_holds_objects_or_a_damaged_state(server, state, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(state, damaged)
    rank_file = damaged / "model-rank-1-part-0.safetensors"
    data = bytearray(rank_file.read_bytes())
    data[-1] ^= 1
    rank_file.write_bytes(bytes(data))
    refused = shardstate(server, "upload", str(damaged), f"s3://{BUCKET}/damaged")
    assert "model-rank-1-part-0.safetensors: tensor " in (line := error_line(refused)) and "checksum" in line
    assert "Contents" not in server.client().list_objects_v2(Bucket=BUCKET, Prefix="damaged/")  # nothing uploaded
    uploaded(server, state, "twice")
    again = shardstate(server, "upload", str(state), f"s3://{BUCKET}/twice")
    assert f"s3://{BUCKET}/twice already holds" in error_line(again)
    server.client().delete_object(Bucket=BUCKET, Key="twice/shardstate.json")  # as an upload stopped half-way
    unfinished = shardstate(server, "upload", str(state), f"s3://{BUCKET}/twice")
    assert "and no manifest: an upload that did not finish" in error_line(unfinished)


def test_objects_changed_truncated_or_missing_are_refused_naming_them(server, state, tmp_path):
    client = server.client()
    name = "model-rank-1-part-0.safetensors"
    data = (state / name).read_bytes()
    cases = {
        "changed": (lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=data[:-1] + bytes([data[-1] ^ 1])),
                    "does not match its checksum in the manifest"),
        "truncated": (lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=data[:-100]),
                      f"is {len(data) - 100} bytes, the manifest says {len(data)}"),
        "missing": (lambda key: client.delete_object(Bucket=BUCKET, Key=key), "does not exist"),
    }
    for case, (damage, expected) in cases.items():
        url = uploaded(server, state, case)
        damage(f"{case}/{name}")
        result = shardstate(server, "generate", url, "--tp", "2", *PROMPT, "--cache-dir", str(tmp_path / case))
        line = error_line(result)
        assert f"{url}/{name}" in line and expected in line, line
        (cached,) = (tmp_path / case).iterdir()
        assert not [p.name for p in cached.iterdir() if ".fetch-" in p.name]  # no temporary left
        assert not (cached / name).exists()


def test_refused_credentials_and_no_server(server, state, tmp_path):
    url = uploaded(server, state, "creds")
    refused = shardstate(server, "generate", url, "--tp", "2", *PROMPT, "--cache-dir", str(tmp_path / "c"),
                         secret="not-the-secret")
    assert f"access to {url} refused" in error_line(refused)
    nobody = S3Server(f"http://127.0.0.1:{_closed_port()}", tmp_path)
    start = time.monotonic()
    unreachable = shardstate(nobody, "generate", url, "--tp", "2", *PROMPT, "--cache-dir", str(tmp_path / "c"))
    assert "cannot reach the S3 endpoint" in error_line(unreachable)
    assert time.monotonic() - start < 60
    schemeless = S3Server("127.0.0.1:1", tmp_path)
    bad_endpoint = shardstate(schemeless, "inspect", url, "--cache-dir", str(tmp_path / "c"))
    assert "cannot use the S3 endpoint '127.0.0.1:1'" in error_line(bad_endpoint)
    (tmp_path / "a-file").write_text("not a directory")
    cache_is_a_file = shardstate(server, "inspect", url, "--cache-dir", str(tmp_path / "a-file"))
    assert "--cache-dir is a file, not a directory" in error_line(cache_is_a_file)
    bad_ranges = shardstate(server, "inspect", url, "--cache-dir", str(tmp_path / "c"),
                            env={"SHARDSTATE_S3_RANGES": "0"})
    assert "SHARDSTATE_S3_RANGES='0' is not an integer from 1 to 64" in error_line(bad_ranges)
    save_to_s3 = shardstate(server, "save", str(state), f"s3://{BUCKET}/saved", "--tp", "2")
    assert "save writes a local directory" in error_line(save_to_s3)
    assert not (Path.cwd() / "s3:").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_dying_mid_download_is_one_error_and_leaves_nothing(tmp_path):
    """The server is SIGKILLed while the ranks download their ~100 MB files: one error line within the
    time-outs, no worker left, no temporary file in the cache (a rank file there is one whose download
    finished and matched the manifest first, written whole)."""
    src = make_llama_checkpoint(tmp_path / "src", seed=1, vocab_size=100_000, hidden_size=256, intermediate_size=256,
                                num_hidden_layers=1, tie_word_embeddings=False)
    convert(src, tmp_path / "tp2", 2)
    cache = tmp_path / "cache"
    with s3_server(tmp_path / "seaweedfs") as dying:
        dying.client().create_bucket(Bucket=BUCKET)
        url = uploaded(dying, tmp_path / "tp2", "big")
        env = {**os.environ, **dying.env(), "SHARDSTATE_TEST_MARKER": "s3-dying"}
        proc = subprocess.Popen([str(BIN / "shardstate"), "generate", url, "--tp", "2", *PROMPT, "--cache-dir",
                                 str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline, served = time.monotonic() + 120, _bytes_written(dying.process.pid)
        while _bytes_written(dying.process.pid) - served < 16 << 20:  # the downloads are under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        dying.stop(signal.SIGKILL)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr.count("\n") == 1, stderr[-3000:]
    assert "S3" in stderr or "cannot reach" in stderr, stderr
    assert time.monotonic() - start < 90
    assert not processes_with_env(b"SHARDSTATE_TEST_MARKER=s3-dying")
    (cached,) = cache.iterdir()
    assert not [p.name for p in cached.iterdir() if ".fetch-" in p.name]
    for path in cached.glob("model-rank-*"):
        assert path.read_bytes() == (tmp_path / "tp2" / path.name).read_bytes(), path.name


def _bytes_written(pid: int) -> int:
    """What a process has written so far (files and sockets: a server's responses), from /proc."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["wchar"])


def test_two_torchrun_nodes_each_fetch_only_their_ranks_files(server, state, tmp_path):
    """`torchrun --nnodes 2 --nproc-per-node 1` twice on this machine (static rendezvous on 127.0.0.1),
    each "node" with its own cache: each cache ends up with its own rank's files only, whole once the
    rank has exited (its background cache write waited for), and rank 0 prints the local run's tokens."""
    url = uploaded(server, state, "nodes")
    port = _closed_port()
    env = {**os.environ, **server.env(), "SHARDSTATE_S3_RANGES": "16"}
    nodes = [
        subprocess.Popen(
            [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
             "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", str(BIN / "shardstate"),
             "generate", url, "--tp", "2", *PROMPT, "--json", "--cache-dir", str(tmp_path / f"node{node}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    (line,) = [ln for ln in outputs[0][0].splitlines() if ln.startswith("{")]
    doc = json.loads(line)
    local = generate(server, str(state), tmp_path / "unused")
    assert [o["token_ids"] for o in doc["outputs"]] == [o["token_ids"] for o in local["outputs"]]
    sizes = rank_sizes(state)
    assert [r["bytes_fetched"] for r in doc["load"]] == [sizes[0], sizes[1]]
    files = json.loads((state / "shardstate.json").read_text())["files"]
    for node in (0, 1):  # each rank's exit waited for its background cache writes: whole files, no temporary
        (cached,) = (tmp_path / f"node{node}").iterdir()
        rank_files = sorted(p.name for p in cached.glob("model-rank-*"))
        assert rank_files == sorted(name for name, record in files.items() if record["rank"] == node)
        assert all((cached / name).read_bytes() == (state / name).read_bytes() for name in rank_files)
        assert not [p.name for p in cached.iterdir() if ".fetch-" in p.name]


def test_convert_publishes_to_s3_like_upload(server, state, tmp_path):
    """`convert SRC s3://...` stages locally, then uploads (manifest last); the result reshards back from
    S3 (`convert s3://... OUT`, every rank fetched) to the bytes of a local reshard."""
    url = f"s3://{BUCKET}/converted"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    done = shardstate(server, "convert", str(state), url, "--tp", "1", *cache)
    assert done.returncode == 0, done.stderr
    names = sorted(o["Key"].removeprefix("converted/")
                   for o in server.client().list_objects_v2(Bucket=BUCKET, Prefix="converted/")["Contents"])
    assert "shardstate.json" in names and "model-rank-0-part-0.safetensors" in names
    again = shardstate(server, "convert", str(state), url, "--tp", "1", *cache)
    assert "already holds" in error_line(again)
    back = shardstate(server, "convert", url, str(tmp_path / "tp2"), "--tp", "2", *cache)
    assert back.returncode == 0, back.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # staging removed
    convert(state, tmp_path / "direct2", 2)
    for rank in range(2):
        assert rank_tensors(tmp_path / "tp2", rank).keys() == rank_tensors(tmp_path / "direct2", rank).keys()
        assert all(a.equal(b) for a, b in zip(rank_tensors(tmp_path / "tp2", rank).values(),
                                               rank_tensors(tmp_path / "direct2", rank).values(), strict=True))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_convert_to_s3_leaves_no_staging_and_no_process(server, tmp_path, sig):
    """`convert SRC s3://...` stages the state under the cache dir: stopped (one line) or killed (its
    janitor) mid-way, the staging directory goes and no process of the run is left."""
    src = make_llama_checkpoint(tmp_path / "src", seed=2, vocab_size=50_000, hidden_size=256, intermediate_size=256,
                                num_hidden_layers=1, tie_word_embeddings=False)
    cache, marker = tmp_path / "cache", f"s3-convert-{sig.name}"
    env = {**os.environ, **server.env(), "SHARDSTATE_TEST_MARKER": marker}
    proc = subprocess.Popen([str(BIN / "shardstate"), "convert", str(src), f"s3://{BUCKET}/stopped-{sig.name}",
                             "--tp", "2", "--max-part-size", "2MB", "--cache-dir", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not list(cache.glob(".shardstate-convert-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("convert finished before the signal")
    if sig == signal.SIGTERM:
        assert stderr.strip().splitlines() == ["error: stopped by SIGTERM; workers stopped, temporaries removed"]
    deadline = time.monotonic() + 10
    while processes_with_env(f"SHARDSTATE_TEST_MARKER={marker}".encode()) or list(cache.glob(".shardstate-convert-*")):
        assert time.monotonic() < deadline, list(cache.iterdir())
        time.sleep(0.05)


def test_crc32_of_ranges_combines_to_the_files():
    """The project's crc32 (zlib-ng's) gives Python's zlib's values, running values and unaligned views
    included, and fetched ranges' crc32s fold into the file's."""
    import random
    import zlib

    from shardstate.io.crc32 import crc32, crc32_combine

    rng = random.Random(0)
    for _ in range(30):
        parts = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(rng.randrange(1, 5))]
        crc, running = 0, 0
        for part in parts:
            crc = crc32_combine(crc, crc32(part), len(part))
            running = crc32(memoryview(part)[1:], crc32(part[:1], running))
        assert crc == running == zlib.crc32(b"".join(parts))
    # parts past 4 GiB (5 GiB is the default part size): the length is carried whole, not modulo 2**32
    crc = 0x12345678
    shifted = crc32_combine(crc, 0, 2**32 + 5)
    assert shifted == crc32_combine(crc32_combine(crc, 0, 2**31), 0, 2**31 + 5) != crc32_combine(crc, 0, 5)
