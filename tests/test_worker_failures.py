"""A worker that dies stops every rank within a bounded time, with the error shown, and leaves no
process behind."""

from __future__ import annotations

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
