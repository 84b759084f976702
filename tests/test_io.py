"""The load I/O engine: every mode gives exactly the file's bytes, and every --io mode loads the same
model (bit-identical parameters, identical greedy tokens) as the default loader."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import PROMPTS
from shardstate import LLM
from shardstate.convert import convert
from shardstate.io import engine
from shardstate.io.engine import Span, read_spans, read_spans_to_device
from shardstate.io.reader import ReadAccount
from test_loaders import assert_states_equal


@pytest.fixture
def data_files(tmp_path):
    files = []
    for n, size in enumerate([3 * 4096 + 17, 10_000, 1]):
        path = tmp_path / f"f{n}.bin"
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


def expected_bytes(spans: list[Span]) -> list[bytes]:
    return [s.path.read_bytes()[s.start : s.end] for s in spans]


@pytest.mark.parametrize("mode", ["read", "mmap", "direct"])
@pytest.mark.parametrize("threads", [1, 3])
def test_every_mode_returns_exactly_the_spans(data_files, monkeypatch, mode, threads):
    monkeypatch.setattr(engine, "CHUNK", 4096)  # many chunks, odd tails
    spans = [Span(data_files[0], 24, 3 * 4096 + 17), Span(data_files[1], 4096 + 8, 9_000), Span(data_files[2], 0, 1)]
    with ReadAccount() as account:
        got = read_spans(spans, mode, account, threads)
        assert [bytes(t.numpy()) for t in got] == expected_bytes(spans)
    wanted = sum(s.size for s in spans)
    if mode == "mmap":
        assert account.bytes_mapped == wanted
    elif mode == "direct":  # whole aligned blocks around each span
        assert wanted <= account.bytes_read <= wanted + 2 * len(spans) * engine.DIRECT_ALIGN
    else:
        assert account.bytes_read == wanted


def test_device_ring_path_runs_on_cpu(data_files):
    """The CUDA path (ring of host buffers, async copies) with a CPU destination: same bytes."""
    spans = [Span(data_files[0], 8, 3 * 4096 + 17), Span(data_files[1], 0, 10_000)]
    with ReadAccount() as account:
        got = read_spans_to_device(spans, torch.device("cpu"), account, ring=2, chunk=4096)
        assert [bytes(t.numpy()) for t in got] == expected_bytes(spans)
        assert account.bytes_read == sum(s.size for s in spans)


def test_truncated_file_is_an_error(data_files):
    from shardstate.errors import ShardstateError

    with ReadAccount() as account, pytest.raises(ShardstateError, match="truncated"):
        read_spans([Span(data_files[1], 0, 20_000)], "read", account)


def test_every_io_mode_loads_the_same_model(checkpoints, tmp_path):
    src = checkpoints["gqa_untied"]
    convert(src, tmp_path / "tp2", 2)
    with LLM(src, tensor_parallel_size=2, load_format="default") as llm:
        reference = llm.rank_state_dicts()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    for io, threads in [("read", 1), ("read", 2), ("mmap", 1), ("direct", 1)]:
        with LLM(tmp_path / "tp2", tensor_parallel_size=2, io=io, io_threads=threads) as llm:
            for state, expected in zip(llm.rank_state_dicts(), reference, strict=True):
                assert_states_equal(state, expected)
            assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)] == tokens
            report = llm.load_reports[0]
            assert (report.bytes_mapped > 0) == (io == "mmap")
            assert report.peak_rss > 0
