"""A worker that dies or hangs stops every rank within a bounded time, with the error shown, and leaves
no process behind. Hangs are real: the rank's process is frozen with SIGSTOP."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS
from shardstate import LLM, ShardstateError
from shardstate.parallel.distributed import free_port, init_group
from shardstate.parallel.peers import loading

BIN = Path(sys.executable).parent


def test_dead_worker_fails_the_next_call_fast_and_reaps_all(checkpoints):
    llm = LLM(checkpoints["gqa_untied"], tensor_parallel_size=2)
    procs = list(llm._procs)
    procs[1].kill()  # rank 1 dies; rank 0 would block in its first all-reduce
    procs[1].join()
    start = time.perf_counter()
    with pytest.raises(ShardstateError, match="worker rank 1 died"):
        llm.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    assert time.perf_counter() - start < 15
    assert not any(p.is_alive() for p in procs)


def test_load_error_on_every_rank_is_one_error(checkpoints, tmp_path):
    with pytest.raises(ShardstateError, match="not a directory"):
        LLM(tmp_path / "missing", tensor_parallel_size=2)


def test_hung_rank_in_a_collective_stops_every_rank_after_the_timeout(checkpoints):
    llm = LLM(checkpoints["gqa_untied"], tensor_parallel_size=2, timeout=3)
    procs = list(llm._procs)
    os.kill(procs[1].pid, signal.SIGSTOP)  # rank 0 will wait for it in its first all-reduce
    start = time.perf_counter()
    with pytest.raises(ShardstateError, match=r"rank 0 timed out waiting for its peers .*no answer from rank\(s\) 1"):
        llm.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    assert 3 <= time.perf_counter() - start < 15
    assert not any(p.is_alive() for p in procs)


def test_rank_silent_after_another_answered_stops_every_rank_after_the_timeout(checkpoints):
    llm = LLM(checkpoints["gqa_untied"], tensor_parallel_size=2, timeout=2)
    procs = list(llm._procs)
    os.kill(procs[1].pid, signal.SIGSTOP)  # state_dict has no collective: rank 0 answers, rank 1 never does
    start = time.perf_counter()
    with pytest.raises(ShardstateError, match=r"rank\(s\) 1 did not answer within 2 s of rank 0.*raise the timeout"):
        llm.rank_state_dicts()
    assert 2 <= time.perf_counter() - start < 10
    assert not any(p.is_alive() for p in procs)


def _load_then_reduce(rank: int, port: int, slow_rank: str, results) -> None:
    """A rank of a real gloo group with a 1 s time-out whose rank 1 takes 2.4 s to load, reading all the
    while ("reads"), reading nothing ("stalls"), or failing after 0.3 s ("fails")."""
    read = [0]
    try:
        group = init_group(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=1)
        with loading(group, lambda: read[0], 1):
            for _ in range(8 if rank == 1 else 0):
                time.sleep(0.3)
                if slow_rank == "fails":
                    raise ShardstateError("cannot read (Input/output error) in model-rank-1-part-0.safetensors")
                read[0] += slow_rank == "reads"
        total = group.all_reduce(torch.ones(1))  # the first collective after the load
        results.put((rank, "ok", float(total)))
    except Exception as exc:
        results.put((rank, "error", str(exc)))


@pytest.mark.parametrize("slow_rank", ["reads", "stalls", "fails"])
def test_a_rank_still_loading_is_waited_for_and_a_stalled_or_failed_one_named(slow_rank):
    """Loading longer than the time-out is not a hang while bytes keep arriving (a big download); a rank
    that reads nothing for the time-out is named, and one that fails is reported at once."""
    context = multiprocessing.get_context("spawn")
    results, port = context.Queue(), free_port()
    procs = [context.Process(target=_load_then_reduce, args=(r, port, slow_rank, results)) for r in range(2)]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    got = {rank: (status, detail) for rank, status, detail in (results.get(timeout=60) for _ in procs)}
    for proc in procs:
        proc.join(timeout=30)
    if slow_rank == "reads":
        assert got == {0: ("ok", 2.0), 1: ("ok", 2.0)}
    elif slow_rank == "stalls":
        assert got[0] == ("error", "rank 1 read nothing for 1 s while loading: a rank is hung or its storage "
                                   "stalled; if it is only slow, raise the timeout")
    else:
        assert got[0] == ("error", "rank 1 failed while loading (cannot read (Input/output error) in "
                                   "model-rank-1-part-0.safetensors)")
        assert time.monotonic() - start < 20


def test_timeout_must_be_positive(checkpoints):
    with pytest.raises(ShardstateError, match="timeout 0 is not a positive number of seconds"):
        LLM(checkpoints["gqa_untied"], tensor_parallel_size=2, timeout=0)


def processes_with_env(*entries: bytes) -> list[int]:
    """PIDs of processes whose environment holds every one of `entries` (b"NAME=value")."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if entry.name.isdigit() and all(e in environ for e in entries):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_hung_rank_under_torchrun_is_one_error_and_no_leftovers(checkpoints, tmp_path):
    """Rank 1 frozen as soon as torchrun starts it: rank 0 gives up after --timeout (in the rendezvous,
    the barrier or a collective, wherever rank 1 stopped), prints one error line and exits; torchrun then
    tears rank 1 down (it waits ~30 s before killing a stopped child)."""
    marker = f"SHARDSTATE_TEST_MARKER={tmp_path}".encode()  # only this test's processes carry it
    proc = subprocess.Popen(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "shardstate"),
         "generate", str(checkpoints["gqa_untied"]), "--tp", "2", "--timeout", "3", "--prompt-ids", "1,2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SHARDSTATE_TEST_MARKER": str(tmp_path)},
    )
    deadline = time.monotonic() + 60
    rank1 = []
    while not rank1 and time.monotonic() < deadline:
        rank1 = processes_with_env(marker, b"LOCAL_RANK=1")
        time.sleep(0.02)
    assert rank1, "torchrun never started rank 1"
    for pid in rank1:
        os.kill(pid, signal.SIGSTOP)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert ours and "rank 0 timed out waiting for its peers" in ours[0], stderr[-3000:]
    assert not processes_with_env(marker)


def test_a_worker_dying_at_start_up_is_an_error_not_a_hang(tmp_path):
    """A program that starts workers without the `if __name__ == "__main__"` guard: each spawned worker
    re-runs it and dies before it reads its arguments. With a manifest past the 64 KiB of a pipe (this
    one: 40 layers at TP=2) those arguments once blocked the driver's `Process.start()` for ever."""
    from shardstate.convert import convert
    from shardstate.synthetic import make_llama_checkpoint

    src = make_llama_checkpoint(tmp_path / "src", seed=1, num_hidden_layers=40)
    convert(src, tmp_path / "tp2", 2)
    assert (tmp_path / "tp2" / "shardstate.json").stat().st_size > 64 << 10
    program = tmp_path / "unguarded.py"
    program.write_text(f"from shardstate import LLM\nLLM({str(tmp_path / 'tp2')!r}, tensor_parallel_size=2)\n")
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120)
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 1 and re.search(r"worker rank \d died", last), result.stderr[-2000:]
