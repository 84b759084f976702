"""Boxes of stored tensors read into parameter views: what the `sliced` loader (a HF checkpoint's tensors)
and a reshard on load (a sharded state's tensors saved at another TP size) both do.

From local files each byte run is read straight into the parameter. From objects (a checkpoint or state
in S3), where every read is a request, each box is read as one range, first run to last (a dim-0 slice
exactly; a dim-1 slice nearly the whole tensor), through the engine's parallel ranged GETs, a batch of
boxes at a time, and its runs are copied out."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardstate.format.checkpoint import TensorLocation
from shardstate.io.engine import Scratch, Span, read_spans
from shardstate.io.reader import ReadAccount, byte_view
from shardstate.spec import Copy, byte_runs

OBJECT_BATCH = 256 << 20  # bytes of slices fetched together from object storage

Plan = list[tuple[TensorLocation, torch.Tensor, Copy]]


def read_boxes(plan: Plan, account: ReadAccount) -> None:
    """Fill every destination of `plan` (stored tensor, destination view, copy of a box of it): from local
    files each byte run straight into place, from objects (every read a request) each box as one range."""
    plan = sorted(plan, key=lambda item: (str(item[0].file), item[0].entry.begin, item[2].src))
    if account.remote is None:
        for location, dest, copy in plan:
            _fill(dest, location, copy, _file_reader(account, location))
    else:
        _load_from_objects(plan, account)


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
