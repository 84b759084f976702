"""The node cache written in the background, against a real S3-compatible server (SeaweedFS on 127.0.0.1):
a load from s3:// returns once the fetched bytes are in memory and their crc32 matched the manifest, and a
thread writes them into the cache. LLM.close() and a process's exit wait for it: the cache then holds the
state's files, byte for byte; a stop during the write leaves no temporary. verify and reshard fetch into
the cache through the same engine, a bounded piece at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from shardstate.convert import convert
from shardstate.runtime.llm import LLM
from shardstate.store import remote
from shardstate.store.model_dir import fetch_every_rank, open_model_dir
from shardstate.synthetic import make_llama_checkpoint
from test_s3 import uploaded
from test_worker_failures import processes_with_env


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    src = make_llama_checkpoint(tmp_path_factory.mktemp("writes") / "src", seed=11, initializer_range=0.1,
                                num_hidden_layers=2)
    convert(src, src.parent / "tp2", 2, max_part_bytes=1 << 16)  # several files per rank
    return src.parent / "tp2"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A TP=2 state whose ranks' files are ~65 MB each: eight of the background writer's 8 MiB blocks."""
    src = make_llama_checkpoint(tmp_path_factory.mktemp("big-writes") / "src", seed=12, vocab_size=64_000,
                                hidden_size=256, intermediate_size=256, num_hidden_layers=1, tie_word_embeddings=False)
    convert(src, src.parent / "tp2", 2)
    return src.parent / "tp2"


@pytest.fixture
def s3_env(server, monkeypatch) -> None:
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)


def cache_of(cache: Path) -> Path:
    (directory,) = cache.iterdir()
    return directory


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".fetch-" in p.name)


def assert_holds_the_state(directory: Path, state: Path, names: list[str] | None = None) -> None:
    """Each rank file (or each of `names`) in the cache: its crc32 the manifest's, its bytes the state's."""
    files = json.loads((state / "shardstate.json").read_text())["files"]
    for name in files if names is None else names:
        data = (directory / name).read_bytes()
        assert zlib.crc32(data) == files[name]["crc32"] and data == (state / name).read_bytes(), name


def test_close_returns_with_the_fetched_files_whole_in_the_cache(server, small, tmp_path, s3_env):
    """Both ranks fetch their files and write them in the background: once `close()` returns they are all in
    the cache, equal to the state's, no temporary left; the weights are bit for bit the local load's."""
    url, cache = uploaded(server, small, "written-on-close"), tmp_path / "cache"
    with LLM(url, tensor_parallel_size=2, cache_dir=cache) as llm:
        fetched = llm.rank_state_dicts()
        assert all(report.bytes_fetched > 0 and report.cached_files == [] for report in llm.load_reports)
    directory = cache_of(cache)
    assert temporaries(directory) == []
    assert_holds_the_state(directory, small)
    with LLM(small, tensor_parallel_size=2) as llm:
        local = llm.rank_state_dicts()
    for ours, theirs in zip(fetched, local, strict=True):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    with LLM(url, tensor_parallel_size=2, cache_dir=cache) as llm:  # the next load reads the cache only
        assert all(report.bytes_fetched == 0 for report in llm.load_reports)


def test_fetching_every_rank_goes_piece_by_piece_and_keeps_intact_files(server, small, tmp_path, s3_env,
                                                                        monkeypatch):
    """verify's and reshard's fetch (`fetch_every_rank`) with pieces of 5000 bytes, so that every file takes
    several reads into the one reused arena: the cache ends up with the state's files; a second fetch keeps
    them all; a damaged one is fetched again, the others kept."""
    monkeypatch.setattr(remote, "PIECE", 5000)
    url = uploaded(server, small, "pieces")
    directory = open_model_dir(url, tmp_path / "cache")
    fetch_every_rank(directory)
    assert temporaries(directory.path) == []
    assert_holds_the_state(directory.path, small)
    manifest = directory.state.manifest
    again = remote.fetch_rank_files(directory.remote, manifest, 1)
    assert again.fetched == [] and again.cached == manifest.rank_files(1)
    damaged = directory.path / manifest.rank_files(1)[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    repaired = remote.fetch_rank_files(directory.remote, manifest, 1)
    assert repaired.fetched == [damaged.name] and repaired.bytes_fetched == len(data)
    assert_holds_the_state(directory.path, small)


# Loads rank 0 of an s3:// state as the vLLM plugin does (load_rank_files, no LLM), then raises a stop
# signal at once. The main thread keeps the GIL unless it blocks (a switch interval of a minute): the
# writer thread, which needs it between two 8 MiB blocks, cannot write the ~65 MB file before the
# signal's handler runs.
LOAD_THEN_STOP = """
import signal, sys
from shardstate.io.reader import ReadAccount
from shardstate.store.model_dir import open_model_dir
from shardstate.store.remote import load_rank_files
directory = open_model_dir(sys.argv[1], sys.argv[2])
with ReadAccount() as account:
    sys.setswitchinterval(60)
    load_rank_files(directory.remote, directory.state.manifest, 0, account, 2)
    signal.raise_signal(getattr(signal, sys.argv[3]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_during_a_background_write_leaves_no_temporary(server, big, tmp_path, sig):
    """A program that loads as the vLLM plugin does, stopped while its file is being written to the cache.
    SIGTERM (left at its default): the write is abandoned, its temporary removed, the process dies of the
    signal after one line. SIGINT (Python's KeyboardInterrupt, not handled): the program unwinds and its
    exit waits for the write, which completes. Either way no temporary is left, and a file under its
    final name is whole."""
    url, cache = uploaded(server, big, f"stopped-{sig.name}"), tmp_path / "cache"
    result = subprocess.run([sys.executable, "-c", LOAD_THEN_STOP, url, str(cache), sig.name], capture_output=True,
                            text=True, env={**os.environ, **server.env()}, timeout=300)
    assert result.returncode == -sig, result.stderr[-3000:]
    directory = cache_of(cache)
    assert temporaries(directory) == []
    name = json.loads((big / "shardstate.json").read_text())["tensors"]["0"]["model.embed_tokens.weight"]["file"]
    if sig == signal.SIGTERM:
        assert result.stderr.splitlines() == ["error: stopped by SIGTERM; workers stopped, temporaries removed"]
        assert not (directory / name).exists()  # abandoned mid-write
    else:
        assert "KeyboardInterrupt" in result.stderr
        assert_holds_the_state(directory, big, [name])


# LLM on an s3:// state; once it is up (the workers' loads returned, their background writes begun) the
# workers are frozen (SIGSTOP), so that they cannot answer `close`; close() then waits for them until a
# Ctrl-C (SIGINT, one second later) interrupts it. Prints the temporaries seen while the workers are frozen.
CLOSE_THEN_CTRL_C = """
import json, os, signal, sys, threading
from pathlib import Path
from shardstate.runtime.llm import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, cache_dir=sys.argv[2])
for proc in llm._procs:
    os.kill(proc.pid, signal.SIGSTOP)
(directory,) = Path(sys.argv[2]).iterdir()
print(json.dumps(sorted(p.name for p in directory.iterdir() if ".fetch-" in p.name)), flush=True)
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
llm.close()
"""


def test_ctrl_c_while_close_waits_for_the_workers_leaves_no_temporary_and_no_worker(server, big, tmp_path):
    """Workers frozen right after their loads returned, mid-write as a rule (each has ~65 MB to write and
    fsync); the driver's close() waits for them, and a Ctrl-C then kills them and removes their
    temporaries: no process of the run is left, and what is in the cache under a final name is whole."""
    url, cache, marker = uploaded(server, big, "ctrl-c-on-close"), tmp_path / "cache", "s3-close-ctrl-c"
    env = {**os.environ, **server.env(), "SHARDSTATE_TEST_MARKER": marker}
    result = subprocess.run([sys.executable, "-c", CLOSE_THEN_CTRL_C, url, str(cache)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert "KeyboardInterrupt" in result.stderr, result.stderr[-3000:]
    frozen_mid_write = json.loads(result.stdout.splitlines()[0])
    assert not processes_with_env(f"SHARDSTATE_TEST_MARKER={marker}".encode())
    directory = cache_of(cache)
    assert temporaries(directory) == [], frozen_mid_write
    assert_holds_the_state(directory, big, [p.name for p in directory.glob("model-rank-*")])
