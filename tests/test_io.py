"""The load I/O engine: every mode gives exactly the file's bytes, and every --io mode loads the same
model (bit-identical parameters, identical greedy tokens) as the default loader."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash

from conftest import PROMPTS
from shardstate import LLM
from shardstate.convert import convert
from shardstate.errors import ShardstateError
from shardstate.io import arena as arena_module
from shardstate.io import engine
from shardstate.io.arena import Reservation
from shardstate.io.digests import Expected, StreamingDigests
from shardstate.io.engine import Span, read_spans, read_spans_to_device
from shardstate.io.reader import ReadAccount
from test_determinism import NoPopulate
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


@pytest.mark.parametrize("threads", [1, 3])
def test_device_ring_path_runs_on_cpu(data_files, threads):
    """The CUDA path (ring of host buffers filled by reader threads, async copies) with a CPU destination:
    same bytes, every byte read once."""
    spans = [Span(data_files[0], 8, 3 * 4096 + 17), Span(data_files[1], 0, 10_000)]
    with ReadAccount() as account:
        got = read_spans_to_device(spans, torch.device("cpu"), account, ring=2, chunk=4096, threads=threads)
        assert [bytes(t.numpy()) for t in got] == expected_bytes(spans)
        assert account.bytes_read == sum(span.size for span in spans)
        assert account.bytes_read == sum(s.size for s in spans)


@pytest.fixture
def tensor_file(tmp_path) -> tuple[Path, list[Expected]]:
    """A file of back-to-back 'tensors' of awkward sizes (some bigger than the test CHUNK), each with the
    xxh3-64 computed here, independently of the engine."""
    sizes = [100, 4096, 9000, 1, 20_000, 333, 4096 * 3]
    data = os.urandom(64 + sum(sizes))
    path = tmp_path / "tensors.bin"
    path.write_bytes(data)
    expected, at = [], 64
    for n, size in enumerate(sizes):
        expected.append(Expected(f"t{n}", at, at + size, xxhash.xxh3_64_hexdigest(data[at : at + size])))
        at += size
    return path, expected


@pytest.mark.parametrize("threads", [1, 3])
def test_streaming_digests_check_every_tensor_while_reading(tensor_file, monkeypatch, threads):
    monkeypatch.setattr(engine, "CHUNK", 8192)
    path, expected = tensor_file
    span = Span(path, 64, expected[-1].end)
    with ReadAccount() as account:
        (got,) = read_spans([span], "read", account, threads, StreamingDigests({path: expected}))
        assert bytes(got.numpy()) == path.read_bytes()[64:]
        read_spans_to_device([span], torch.device("cpu"), account, ring=2, chunk=5000,
                             digests=StreamingDigests({path: expected}), threads=threads)
    for target in (expected[0], expected[4], expected[-1]):  # first, bigger than a chunk, last
        data = bytearray(path.read_bytes())
        data[target.end - 1] ^= 0x80
        path.write_bytes(bytes(data))
        for read in (lambda a: read_spans([span], "read", a, threads, StreamingDigests({path: expected})),
                     lambda a: read_spans_to_device([span], torch.device("cpu"), a, ring=2, chunk=5000,
                                                    digests=StreamingDigests({path: expected}))):
            with ReadAccount() as account, pytest.raises(ShardstateError, match=f"tensor '{target.name}' does not"):
                read(account)
        data[target.end - 1] ^= 0x80
        path.write_bytes(bytes(data))


def test_chunks_start_on_tensor_boundaries_when_checking(monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 100)
    cuts = [0, 30, 60, 90, 400, 410, 420]
    ranges = engine._cut(0, 420, cuts)
    assert ranges == [(0, 90), (90, 400), (400, 420)]  # packed up to CHUNK; a bigger tensor alone
    assert engine._cut(0, 250, []) == [(0, 100), (100, 200), (200, 250)]


def test_reserved_memory_is_what_a_read_fills(data_files):
    """A Reservation (io/arena.py): the read lands in the reserved arena itself, faulted in by its thread or
    by the read; one too small for the spans is let go for a fresh arena, with the same bytes."""
    spans = [Span(data_files[0], 24, 3 * 4096 + 17), Span(data_files[1], 8, 10_000)]
    needed = 3 * 4096 + 17 - 24 + 64 + 10_000 - 8
    for size, inside in ((needed, True), (100, False)):
        memory = Reservation(size)
        reserved = memory.arena(0).tensor
        with ReadAccount() as account:
            got = read_spans(spans, "read", account, 2, scratch=memory)
        assert [bytes(t.numpy()) for t in got] == expected_bytes(spans)
        assert (got[0].untyped_storage().data_ptr() == reserved.untyped_storage().data_ptr()) == inside
        memory.release()
        assert memory.size == 0


def test_a_read_skips_the_populate_calls_where_the_reservation_has_been(data_files, monkeypatch):
    """Once the reservation's thread has faulted the arena in, the read calls no populate madvise of its own
    (on present pages it still costs a page walk, ~15% of a warm read); a fresh arena's read does."""
    spans = [Span(data_files[0], 24, 3 * 4096 + 17), Span(data_files[1], 8, 10_000)]
    memory = Reservation(1 << 20)
    deadline = time.monotonic() + 60
    while memory.faulted < memory.size and time.monotonic() < deadline:
        time.sleep(0.01)
    calls = []
    prefault = arena_module.Arena.prefault
    monkeypatch.setattr(arena_module.Arena, "prefault", lambda arena, *a: calls.append(a) or prefault(arena, *a))
    for scratch, populated in ((memory, False), (None, True)):
        with ReadAccount() as account:
            got = read_spans(spans, "read", account, 2, scratch=scratch)
        assert [bytes(t.numpy()) for t in got] == expected_bytes(spans)
        assert bool(calls) == populated
    memory.release()


def test_reservation_never_writes_where_the_kernel_cannot_prefault(data_files, monkeypatch):
    """Without MADV_POPULATE_WRITE the reservation's thread stops rather than touch pages (a write could
    land on bytes a reader has filled); the read faults its pages in itself, and its bytes are right."""
    monkeypatch.setattr(arena_module.mmap, "mmap", NoPopulate)
    spans = [Span(data_files[0], 24, 3 * 4096 + 17), Span(data_files[1], 8, 10_000)]
    memory = Reservation(1 << 20)
    with ReadAccount() as account:
        got = read_spans(spans, "read", account, 2, scratch=memory)
    assert [bytes(t.numpy()) for t in got] == expected_bytes(spans)
    assert memory.faulted == 0
    memory.release()


def test_a_worker_reserves_its_memory_before_importing_torch():
    """runtime/worker_start.py runs first in a spawned worker: importing it must not pull torch in, or the
    pages could not be faulted in while torch loads."""
    code = "import sys, shardstate.runtime.worker_start; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_truncated_file_is_an_error(data_files):
    with ReadAccount() as account, pytest.raises(ShardstateError, match="truncated"):
        read_spans([Span(data_files[1], 0, 20_000)], "read", account)


def test_every_io_mode_loads_the_same_model(checkpoints, tmp_path, monkeypatch):
    """Also --io read with the reserved, pre-faulted load memory and huge pages each on and off, and a HF
    load (which copies into its parameters: their memory is what is reserved) with and without it."""
    src = checkpoints["gqa_untied"]
    convert(src, tmp_path / "tp2", 2)
    with LLM(src, tensor_parallel_size=2, load_format="default") as llm:
        reference = llm.rank_state_dicts()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    for io, threads, prefault, hugepages in [("read", 1, "1", "1"), ("read", 2, "1", "0"), ("read", 2, "0", "1"),
                                             ("mmap", 1, "1", "1"), ("direct", 1, "1", "1")]:
        monkeypatch.setenv("SHARDSTATE_PREFAULT", prefault)  # the workers inherit them
        monkeypatch.setenv("SHARDSTATE_HUGEPAGES", hugepages)
        with LLM(tmp_path / "tp2", tensor_parallel_size=2, io=io, io_threads=threads) as llm:
            for state, expected in zip(llm.rank_state_dicts(), reference, strict=True):
                assert_states_equal(state, expected)
            assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)] == tokens
            report = llm.load_reports[0]
            assert (report.bytes_mapped > 0) == (io == "mmap")
            assert (report.bytes_prefaulted > 0) == (io == "read" and prefault == "1")
    for prefault in ("1", "0"):
        monkeypatch.setenv("SHARDSTATE_PREFAULT", prefault)
        with LLM(src, tensor_parallel_size=2, load_format="sliced") as llm:
            for state, expected in zip(llm.rank_state_dicts(), reference, strict=True):
                assert_states_equal(state, expected)
            assert all((r.bytes_prefaulted > 0) == (prefault == "1") for r in llm.load_reports)
            assert report.peak_rss > 0


def _resident_bytes(address: int, size: int) -> int:
    """Bytes of [address, address + size) resident in this process (from /proc/self/pagemap's present bits)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = address // page, (address + size - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    return sum(page for i in range(0, len(entries), 8) if entries[i + 7] & 0x80)


def test_populate_memory_faults_in_a_foreign_allocation_without_changing_it():
    """The vLLM plugin faults each block of vLLM's parameters in with one madvise before reading into it:
    the whole pages of the range become resident, the partial pages at the ends are left, the bytes stay."""
    size = 32 << 20
    fresh = torch.empty(size + 3 * 4096, dtype=torch.uint8)
    address = fresh.data_ptr() + 100  # not page aligned, as a parameter inside an allocation may be
    whole_pages = (address + size) // 4096 * 4096 - -(-address // 4096) * 4096
    assert _resident_bytes(address, size) < whole_pages  # fresh: the kernel has not faulted it in yet
    arena_module.populate_memory(address, size)
    assert _resident_bytes(address, size) >= whole_pages
    written = torch.arange(size, dtype=torch.int64).to(torch.uint8)
    fresh[100 : 100 + size] = written
    arena_module.populate_memory(address, size)  # on present pages: nothing written
    arena_module.populate_memory(address + 1, 10)  # no whole page: nothing at all
    assert torch.equal(fresh[100 : 100 + size], written)
