"""A worker that dies or hangs stops every rank within a bounded time, with the error shown, and leaves
no process behind. Hangs are real: the rank's process is frozen with SIGSTOP."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import PROMPTS
from shardstate import LLM, ShardstateError


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


def test_timeout_must_be_positive(checkpoints):
    with pytest.raises(ShardstateError, match="timeout 0 is not a positive number of seconds"):
        LLM(checkpoints["gqa_untied"], tensor_parallel_size=2, timeout=0)
