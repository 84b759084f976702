"""The load I/O engine: put byte spans of files into memory once, with large sequential reads, and hand
back one uint8 tensor per span that parameters become views of (no per-tensor copies).

Modes:
- read   (default) one pre-faulted allocation for all spans, filled by big preadv chunks in file order,
         optionally from several threads (preadv releases the GIL);
- mmap   each file mapped privately and its pages populated; parameters alias the page cache (no copy,
         no zeroing; pages shared between ranks on one host; writes stay private);
- direct O_DIRECT reads into page-aligned memory, bypassing the page cache.
On a CUDA device, `read` goes through a small ring of pinned host buffers with asynchronous copies into
one device allocation, overlapping disk reads with host-to-device copies; the same ring code runs on
the CPU (unpinned, synchronous) where no GPU is present.
Files are read through the storage protocol (io/storage.py): an object in S3 is read the same way, each
16 MiB chunk one ranged GET straight into the arena, `parallel` of them in flight (read mode only).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from shardstate.errors import ShardstateError
from shardstate.io.arena import MADV_POPULATE_READ, PAGE, Arena, Scratch, align_down, align_up
from shardstate.io.digests import StreamingDigests
from shardstate.io.reader import Arrivals, ReadAccount

IO_MODES = ("read", "mmap", "direct")
CHUNK = 16 << 20
HASH_PIECE = 256 << 10  # --verify reads this much at a time and hashes it at once, while it is in L2 cache
DIRECT_ALIGN = 4096


@dataclass(frozen=True)
class Span:
    path: Path
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Chunk:
    """One reader task: `length` bytes of `path` from `offset` into the arena, read in pieces of at most
    CHUNK bytes, in order."""

    path: Path
    offset: int  # in the file
    arena_offset: int
    length: int
    needed: int  # bytes that must arrive (direct mode may ask past EOF)


def _cut(start: int, end: int, cuts: list[int]) -> list[tuple[int, int]]:
    """[start, end) as consecutive ranges of about CHUNK bytes. With `cuts` (tensor boundaries) ranges
    start and end only on cuts: whole tensors, packed up to CHUNK, a bigger tensor alone."""
    if not cuts:
        return [(at, min(at + CHUNK, end)) for at in range(start, end, CHUNK)]
    points = sorted({start, end, *(c for c in cuts if start < c < end)})
    ranges, first = [], start
    for previous, point in itertools.pairwise(points):
        if point - first > CHUNK and previous > first:
            ranges.append((first, previous))
            first = previous
    ranges.append((first, end))
    return ranges


class ByteSink(Protocol):
    def feed(self, path: Path, offset: int, data: memoryview) -> None:
        """`data` are the bytes of `path` from `offset`, just read (from any reader thread)."""
        ...


def _read_chunks(arena: Arena, chunks: list[Chunk], threads: int, account: ReadAccount, flags: int,
                 sinks: list[ByteSink]) -> None:
    """Populate and fill each chunk of the arena from its file, feeding `sinks` as pieces arrive. A local
    file is read in pieces small enough to be hashed while in cache when something is fed; an object
    (each read a request) a chunk at a time, with as many chunks in flight as it asks for."""
    readers = {path: account.reader(path, flags) for path in {chunk.path for chunk in chunks}}
    threads = max([threads, *(reader.parallel for reader in readers.values())])

    def run(chunk: Chunk) -> int:
        reader = readers[chunk.path]
        step = CHUNK if reader.remote or not sinks else min(CHUNK, HASH_PIECE)
        for at in range(0, chunk.length, CHUNK):
            arena.populate(chunk.arena_offset + at, min(CHUNK, chunk.length - at))
            for piece in range(at, min(at + CHUNK, chunk.length), step):
                length = min(step, at + CHUNK - piece, chunk.length - piece)
                view = arena.view(chunk.arena_offset + piece, length)
                got = reader.read_into(chunk.offset + piece, view)
                Arrivals.add(got)
                if got < min(length, chunk.needed - piece):
                    raise ShardstateError(f"file ends before byte {chunk.offset + chunk.needed}", chunk.path,
                                          "the file is truncated")
                for fed in range(0, got, HASH_PIECE):
                    for sink in sinks:
                        sink.feed(chunk.path, chunk.offset + piece + fed, view[fed : min(got, fed + HASH_PIECE)])
        return chunk.needed

    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(run, chunk) for chunk in chunks]
            try:
                account.bytes_read += sum(future.result() for future in futures)
            finally:  # a failed chunk: those not started yet are dropped, not read in vain
                pool.shutdown(wait=True, cancel_futures=True)
    else:
        account.bytes_read += sum(run(chunk) for chunk in chunks)


def read_spans(
    spans: list[Span], mode: str, account: ReadAccount, threads: int = 1, digests: StreamingDigests | None = None,
    scratch: Scratch | None = None, sink: ByteSink | None = None,
) -> list[torch.Tensor]:
    """The bytes of each span as a uint8 CPU tensor (views of one arena, or of file mappings). In read
    mode, `digests` and `sink` are fed every byte as it arrives (chunks then start on the digests' tensor
    boundaries); with `scratch` the arena is reused from the previous call."""
    if mode == "mmap":
        return [_map_span(span, account) for span in spans]
    if mode not in ("read", "direct"):
        raise ShardstateError(f"unknown I/O mode '{mode}'", None, f"use one of {', '.join(IO_MODES)}")
    if (digests is not None or sink is not None) and mode != "read":
        raise ValueError("streaming digests need --io read (direct reads whole aligned blocks)")
    align = DIRECT_ALIGN if mode == "direct" else 1
    # Each span's region: in direct mode the aligned file range around it, placed at an aligned address.
    regions, cursor = [], 0
    for span in spans:
        first, last = align_down(span.start, align), align_up(span.end, align)
        cursor = align_up(cursor, max(align, 64))
        regions.append((cursor, first, last))
        cursor += last - first
    arena = scratch.arena(cursor) if scratch is not None else Arena(cursor)
    chunks = [
        Chunk(span.path, lo, base + lo - first, hi - lo, max(0, min(hi, span.end) - lo))
        for span, (base, first, last) in zip(spans, regions, strict=True)
        for lo, hi in _cut(first, last, digests.boundaries(span.path) if digests else [])
    ]
    flags = os.O_DIRECT if mode == "direct" else 0
    try:
        _read_chunks(arena, chunks, threads, account, flags, [s for s in (digests, sink) if s is not None])
    except OSError as exc:
        raise ShardstateError(f"{mode} read failed ({exc.strerror})", spans[0].path if spans else None,
                              "use --io read on this filesystem") from None
    if digests is not None:
        digests.finish()
    return [
        arena.tensor[base + span.start - first : base + span.start - first + span.size]
        for span, (base, first, _) in zip(spans, regions, strict=True)
    ]


def _map_span(span: Span, account: ReadAccount) -> torch.Tensor:
    fd = account.open_fd(span.path)
    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    start = align_down(span.start, PAGE)
    with contextlib.suppress(OSError, ValueError):  # map the span's pages now (from disk if cold), so that
        mapping.madvise(MADV_POPULATE_READ, start, span.end - start)  # "loaded" means resident
    account.bytes_mapped += span.size
    Arrivals.add(span.size)
    return torch.frombuffer(mapping, dtype=torch.uint8, offset=span.start, count=span.size)


@dataclass(frozen=True)
class _Piece:
    """One ring slot's worth of a span: `length` bytes of `path` from `offset`, to `dest_offset`."""

    path: Path
    offset: int
    length: int
    dest_offset: int


def read_spans_to_device(
    spans: list[Span], device: torch.device, account: ReadAccount, ring: int = 8, chunk: int = CHUNK,
    digests: StreamingDigests | None = None, threads: int = 1,
) -> list[torch.Tensor]:
    """Read through a ring of `ring` host buffers (pinned on CUDA) into one allocation on `device`:
    `threads` reader threads fill the next slots while the previous ones are copied (asynchronously, on a
    side stream, on CUDA). Pieces are copied in file order, so `digests` is fed each buffer before its
    copy (--verify never reads back). A slot is refilled only once the copy out of it has finished. Works
    on any device (on the CPU: unpinned buffers, synchronous copies)."""
    cuda = device.type == "cuda"
    total = sum(span.size for span in spans)
    dest = torch.empty(total, dtype=torch.uint8, device=device)
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(ring)]
    copied: list[Any] = [None] * ring  # each slot's last copy (a CUDA event), None once it may be refilled
    stream = torch.cuda.Stream(device) if cuda else None
    readers = {span.path: account.reader(span.path) for span in spans}
    pieces, views, out = [], [], 0
    for span in spans:
        views.append(dest[out : out + span.size])
        for offset in range(span.start, span.end, chunk):
            length = min(chunk, span.end - offset)
            pieces.append(_Piece(span.path, offset, length, out))
            out += length

    def fill(index: int) -> torch.Tensor:
        slot, piece = index % ring, pieces[index]
        if copied[slot] is not None:
            copied[slot].synchronize()  # the copy out of this buffer has finished
        host = buffers[slot][: piece.length]
        got = readers[piece.path].read_into(piece.offset, memoryview(host.numpy()))
        Arrivals.add(got)
        if got < piece.length:
            raise ShardstateError(f"file ends before byte {piece.offset + piece.length}", piece.path,
                                  "the file is truncated")
        return host

    with ThreadPoolExecutor(max(1, threads)) as pool:
        filling = {i: pool.submit(fill, i) for i in range(min(ring, len(pieces)))}
        try:
            for index, piece in enumerate(pieces):
                host = filling.pop(index).result()
                account.bytes_read += piece.length
                if digests is not None:
                    digests.feed(piece.path, piece.offset, memoryview(host.numpy()))
                target = dest[piece.dest_offset : piece.dest_offset + piece.length]
                slot = index % ring
                if cuda:
                    with torch.cuda.stream(stream):
                        target.copy_(host, non_blocking=True)
                        copied[slot] = torch.cuda.Event()
                        copied[slot].record(stream)
                else:
                    target.copy_(host)
                if index + ring < len(pieces):
                    filling[index + ring] = pool.submit(fill, index + ring)
        finally:  # a failed read: those not started yet are dropped, not read in vain
            pool.shutdown(wait=True, cancel_futures=True)
    if cuda:
        stream.synchronize()
    if digests is not None:
        digests.finish()
    return views
