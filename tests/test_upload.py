"""`shardstate upload` (and `convert ... s3://`, which uploads the same way) against a real SeaweedFS on
127.0.0.1: a stop mid-upload (a real CLI process, SIGINT, SIGTERM, SIGHUP) ends it within seconds and
leaves nothing at the prefix, neither objects nor multipart uploads; a SIGKILLed upload leaves its marker,
objects and open multipart uploads, and the same upload run again keeps the whole objects, aborts the
open uploads and finishes; every refusal (a directory `verify` refuses, a FIFO, a link leading outside, a
missing side file, an s3:// DIR, a prefix inside or above another state, one holding another state's
unfinished upload or foreign objects) comes before anything is sent.

Each stop lands mid-upload deterministically: the process is frozen (SIGSTOP) once its rank files are on
their way, signalled, then let go (SIGCONT)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import test_s3
from shardstate.cli import main
from shardstate.convert import convert
from shardstate.store.upload import MARKER_FORMAT, MARKER_NAME, PART_ENV
from shardstate.synthetic import make_llama_checkpoint
from test_s3 import BIN, BUCKET

state = test_s3.state  # a small TP=2 state (many parts); the session's SeaweedFS is conftest's `server`
SMALL_PARTS = {PART_ENV: "5"}  # S3's smallest part: the big state's files go in 2-3 parts each


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """(a ~70 MB checkpoint, its TP=2 state in files of at most 12 MB): an upload of it makes ~15 requests."""
    root = tmp_path_factory.mktemp("big")
    src = make_llama_checkpoint(root / "src", seed=4, vocab_size=32_000, hidden_size=256, intermediate_size=256,
                                num_hidden_layers=1, tie_word_embeddings=False)
    convert(src, root / "tp2", 2, max_part_bytes=12_000_000)
    return src, root / "tp2"


def listing(server, prefix: str) -> tuple[dict[str, dict], list[str]]:
    """(objects under `prefix/`, by name: their listing; the names of its open multipart uploads)."""
    client = server.client()
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/").get("Uploads", [])
    return ({o["Key"].removeprefix(f"{prefix}/"): o for o in objects},
            [u["Key"].removeprefix(f"{prefix}/") for u in uploads])


@contextlib.contextmanager
def running(server, *args: str) -> Iterator[subprocess.Popen]:
    """`shardstate *args`, killed on the way out if a failed check left it running (or frozen)."""
    proc = subprocess.Popen([str(BIN / "shardstate"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **server.env(), **SMALL_PARTS})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def freeze_when(proc: subprocess.Popen, condition: Callable[[], bool]) -> None:
    """Stop `proc` (SIGSTOP) once `condition()` holds, and still holds once the requests it had in flight
    have landed."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        if condition():
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.2)
            if condition():
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)


def mid_upload(server, prefix: str) -> Callable[[], bool]:
    """Rank files on their way (a multipart upload open, or one already up) and no manifest yet."""
    def holds() -> bool:
        objects, uploads = listing(server, prefix)
        return (bool(uploads) or any(n.startswith("model-rank-") for n in objects)) and "shardstate.json" not in objects
    return holds


@pytest.mark.parametrize(("command", "sig"), [("upload", signal.SIGINT), ("upload", signal.SIGTERM),
                                              ("convert", signal.SIGHUP)], ids=lambda v: getattr(v, "name", v))
def test_a_stop_takes_the_upload_back_within_seconds(server, big, tmp_path, command, sig):
    """Signalled mid-upload (`convert SRC s3://...` stages, then uploads): out within 10 s, one line, nothing
    at the prefix, neither objects nor multipart uploads, and no staging directory left."""
    prefix, cache = f"stop-{command}-{sig.name}", tmp_path / "cache"
    url = f"s3://{BUCKET}/{prefix}"
    args = (["upload", str(big[1]), url, "--parallel", "1"] if command == "upload" else
            ["convert", str(big[0]), url, "--tp", "2", "--max-part-size", "12MB", "--cache-dir", str(cache)])
    with running(server, *args) as proc:
        freeze_when(proc, mid_upload(server, prefix))
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        began = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - began < 10
    assert listing(server, prefix) == ({}, [])
    assert proc.returncode == 128 + sig, stderr
    assert stderr.splitlines() == [f"error: stopped by {sig.name}; upload aborted, nothing left at {url}"]
    assert not cache.exists() or [p.name for p in cache.iterdir() if p.name.startswith(".shardstate-convert")] == []


def test_a_killed_upload_is_resumed_by_the_same_upload(server, big):
    """SIGKILL leaves the marker, whole rank objects and open multipart uploads; the same upload again
    keeps the whole objects (not sent again), aborts the open uploads and publishes the state."""
    prefix, state_dir = "killed", big[1]
    url = f"s3://{BUCKET}/{prefix}"

    def some_up_some_open() -> bool:
        objects, uploads = listing(server, prefix)
        return bool(uploads) and any(n.startswith("model-rank-") for n in objects)

    with running(server, "upload", str(state_dir), url, "--parallel", "2") as proc:
        freeze_when(proc, some_up_some_open)
        proc.kill()
        proc.communicate()
    objects, uploads = listing(server, prefix)
    assert MARKER_NAME in objects and "shardstate.json" not in objects and uploads
    whole = {n: o["ETag"] for n, o in objects.items() if n.startswith("model-rank-")}
    result = test_s3.shardstate(server, "upload", str(state_dir), url, env=SMALL_PARTS)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((state_dir / "shardstate.json").read_text())
    sent = len(manifest["files"]) - len(whole) + len(manifest["side_files"]) + 1
    assert f": {sent} files," in result.stdout and f"{len(whole)} already there" in result.stdout, result.stdout
    objects, uploads = listing(server, prefix)
    assert uploads == []
    assert sorted(objects) == sorted([*manifest["files"], *manifest["side_files"], "shardstate.json"])
    assert all(objects[n]["ETag"] == etag for n, etag in whole.items())
    client = server.client()
    for name in objects:
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read()
        assert body == (state_dir / name).read_bytes(), name
    again = test_s3.shardstate(server, "upload", str(state_dir), url)
    assert f"{url} already holds this state" in test_s3.error_line(again)


def upload(monkeypatch, capsys, server, directory: Path | str, url: str) -> tuple[int, str]:
    """`shardstate upload` in this process: (exit code, stderr)."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    code = main(["upload", str(directory), url])
    return code, capsys.readouterr().err


def test_every_refusal_comes_before_anything_is_sent(server, state, tmp_path, monkeypatch, capsys):
    client = server.client()
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "not for publishing"}')
    outside = tmp_path / "outside.safetensors"

    def fifo(d: Path) -> None:
        (d / "generation_config.json").unlink()
        os.mkfifo(d / "generation_config.json")

    def side_link(d: Path) -> None:
        (d / "generation_config.json").unlink()
        (d / "generation_config.json").symlink_to(secret)

    def rank_link(d: Path) -> None:
        shutil.move(d / "model-rank-1-part-0.safetensors", outside)
        (d / "model-rank-1-part-0.safetensors").symlink_to(outside)

    directories = {
        "fifo": (fifo, "generation_config.json is not a regular file"),
        "side-link": (side_link, "generation_config.json leads outside the directory"),
        "rank-link": (rank_link, "model-rank-1-part-0.safetensors leads outside the directory"),
        "missing": (lambda d: (d / "generation_config.json").unlink(), "side file generation_config.json is missing"),
    }
    for case, (damage, expected) in directories.items():
        directory = tmp_path / case
        shutil.copytree(state, directory, symlinks=True)
        damage(directory)
        code, err = upload(monkeypatch, capsys, server, directory, f"s3://{BUCKET}/{case}")
        assert code == 1 and err.count("\n") == 1 and expected in err, (case, err)
        assert listing(server, case) == ({}, []), case
    code, err = upload(monkeypatch, capsys, server, f"s3://{BUCKET}/fifo", f"s3://{BUCKET}/elsewhere")
    assert code == 1 and err == (f"error: 's3://{BUCKET}/fifo' is an s3:// location, not a local directory: give "
                                 "the directory of a sharded state on this machine\n")

    assert upload(monkeypatch, capsys, server, state, f"s3://{BUCKET}/outer/inner")[0] == 0
    state_id = json.loads((state / "shardstate.json").read_text())["state_id"]
    client.put_object(Bucket=BUCKET, Key=f"other/{MARKER_NAME}",
                      Body=json.dumps({"format": MARKER_FORMAT, "state_id": "f" * 32}).encode())
    for key in (f"ours/{MARKER_NAME}", f"ours-and-notes/{MARKER_NAME}"):
        client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps({"format": MARKER_FORMAT, "state_id": state_id}))
    client.put_object(Bucket=BUCKET, Key="ours-and-notes/notes.txt", Body=b"someone's")
    client.create_multipart_upload(Bucket=BUCKET, Key="busy/something.bin")
    prefixes = {
        "outer/inner/deeper": f"s3://{BUCKET}/outer/inner/deeper is inside s3://{BUCKET}/outer/inner, which holds a "
                              "sharded state (shardstate.json)",
        "outer": f"s3://{BUCKET}/outer holds a sharded state below it, at s3://{BUCKET}/outer/inner",
        "other": f"s3://{BUCKET}/other holds an unfinished upload of another state ({'f' * 32})",
        "ours-and-notes": f"s3://{BUCKET}/ours-and-notes holds 'notes.txt', which is not this state's",
        "busy": f"s3://{BUCKET}/busy has an upload in progress that is not shardstate's",
    }
    for prefix, expected in prefixes.items():
        before = listing(server, prefix)
        code, err = upload(monkeypatch, capsys, server, state, f"s3://{BUCKET}/{prefix}")
        assert code == 1 and err.count("\n") == 1 and expected in err, (prefix, err)
        assert listing(server, prefix) == before, prefix
    # an unfinished upload of this state that holds only its marker: resumed (here: finished) by the same upload
    assert upload(monkeypatch, capsys, server, state, f"s3://{BUCKET}/ours")[0] == 0
    objects, uploads = listing(server, "ours")
    assert MARKER_NAME not in objects and "shardstate.json" in objects and uploads == []
