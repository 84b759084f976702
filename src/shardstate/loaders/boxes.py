"""Boxes of stored tensors read into parameter views: what the `sliced` loader (a HF checkpoint's tensors)
and a reshard on load (a sharded state's tensors saved at another TP size) both do.

From local files each byte run is read straight into the parameter, except where a box is many small runs
close together (a column slice: an MoE expert's w2 at TP>1 is one run per row): then its whole rows are read
into scratch with a few large reads, WINDOW bytes at most at a time, and the box is cut from them. From
objects (a checkpoint or state in S3), where every read is a request, each box is read as one range, first
run to last (a dim-0 slice exactly; a dim-1 slice nearly the whole tensor), through the engine's parallel
ranged GETs, a batch of boxes at a time, and its runs are copied out."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from shardstate.format.checkpoint import TensorLocation
from shardstate.io.arena import Scratch
from shardstate.io.engine import Span, read_spans
from shardstate.io.reader import ReadAccount, byte_view
from shardstate.spec import Copy, byte_runs, cut

OBJECT_BATCH = 256 << 20  # bytes of slices fetched together from object storage
WINDOW = 32 << 20  # the most bytes of whole rows a local read puts into scratch at once
ROW_GAP = 64 << 10  # ...for boxes that skip at most this many bytes per row (less than a small read costs)

Plan = list[tuple[TensorLocation, torch.Tensor, Copy]]


def read_boxes(plan: Plan, account: ReadAccount, window: int = WINDOW) -> None:
    """Fill every destination of `plan` (stored tensor, destination view, copy of a box of it): from local
    files each byte run straight into place, or a scattered box from its whole rows, `window` bytes at a
    time; from objects (every read a request) each box as one range."""
    plan = sorted(plan, key=lambda item: (str(item[0].file), item[0].entry.begin, item[2].src))
    if account.remote is None:
        scratch = Scratch()
        for location, dest, copy in plan:
            if _scattered(location, copy, window):
                _fill_from_rows(dest, location, copy, account, scratch, window)
            else:
                _fill(dest, location, copy, _file_reader(account, location))
    else:
        _load_from_objects(plan, account)


def _row_bytes(location: TensorLocation) -> int:
    return math.prod(location.entry.shape[1:]) * location.entry.dtype.itemsize


def _scattered(location: TensorLocation, copy: Copy, window: int) -> bool:
    """Is the box not whole rows, but skips at most ROW_GAP bytes per row, with rows that fit `window`?"""
    rows, row = copy.src[0][1], _row_bytes(location)
    skipped = rows * row - copy.numel() * location.entry.dtype.itemsize
    return 0 < skipped <= rows * ROW_GAP and row <= window


def _fill_from_rows(dest: torch.Tensor, location: TensorLocation, copy: Copy, account: ReadAccount,
                    scratch: Scratch, window: int) -> None:
    """`dest` cut from the box's whole rows of the stored tensor, read into `scratch` at most `window` bytes
    at a time: one large read where reading each row's run would be one small read per row."""
    entry, row = location.entry, _row_bytes(location)
    (first, rows), rest = copy.src[0], copy.src[1:]
    step = window // row
    for at in range(first, first + rows, step):
        count = min(step, first + rows - at)
        start = entry.begin + at * row
        (raw,) = read_spans([Span(location.file, start, start + count * row)], "read", account, scratch=scratch)
        stored = raw.view(entry.dtype).view(count, *entry.shape[1:])
        dest[at - first : at - first + count].copy_(cut(stored, ((0, count), *rest)))


def _fill(dest: torch.Tensor, location: TensorLocation, copy: Copy,
          read: Callable[[int, memoryview], None]) -> None:
    """`dest` from the byte runs of its slice, `read(offset in the tensor, into)` for each. Same dtype into
    contiguous memory: straight into the parameter; else into a staging tensor, then copied once."""
    entry = location.entry
    direct = entry.dtype == dest.dtype and dest.is_contiguous()
    staging = dest if direct else torch.empty(dest.shape, dtype=entry.dtype)
    memory = byte_view(staging)
    filled = 0
    for offset, length in byte_runs(entry.shape, entry.dtype.itemsize, copy.src):
        read(offset, memory[filled : filled + length])
        filled += length
    if staging is not dest:
        dest.copy_(staging)


def _load_from_objects(plan: Plan, account: ReadAccount) -> None:
    scratch = Scratch()
    for batch in _batches(plan):
        spans = [Span(location.file, location.entry.begin + lo, location.entry.begin + hi)
                 for (location, _, _), (lo, hi) in batch]
        memory = read_spans(spans, "read", account, scratch=scratch)
        for ((location, dest, copy), _), span, data in zip(batch, spans, memory, strict=True):
            _fill(dest, location, copy, _copier(memoryview(data.numpy()), span.start - location.entry.begin))


def _batches(plan: Plan) -> list[list[tuple[tuple[TensorLocation, torch.Tensor, Copy], tuple[int, int]]]]:
    """The plan's slices with their extents (bytes within the tensor, first run to the end of the last),
    in batches of about OBJECT_BATCH bytes."""
    batches: list = [[]]
    size = 0
    for item in plan:
        location, _, copy = item
        runs = byte_runs(location.entry.shape, location.entry.dtype.itemsize, copy.src) or [(0, 0)]
        extent = (runs[0][0], runs[-1][0] + runs[-1][1])
        if size >= OBJECT_BATCH:
            batches.append([])
            size = 0
        batches[-1].append((item, extent))
        size += extent[1] - extent[0]
    return batches


def _file_reader(account: ReadAccount, location: TensorLocation) -> Callable[[int, memoryview], None]:
    """A `read` for _fill that reads the tensor's bytes from its file."""

    def read(offset: int, memory: memoryview) -> None:
        account.read_into(location.file, location.entry.begin + offset, memory)

    return read


def _copier(raw: memoryview, first: int) -> Callable[[int, memoryview], None]:
    """A `read` for _fill that copies from `raw`, a tensor's bytes from offset `first` on."""

    def read(offset: int, memory: memoryview) -> None:
        memory[:] = raw[offset - first : offset - first + len(memory)]

    return read
