"""Write safetensors files: split tensors into parts, build each header up front from the planned
tensors, then stream the data in that order."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import xxhash

from shardstate.errors import failing_as
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.io.crc32 import crc32
from shardstate.io.reader import byte_view

ALIGNMENT = 8  # safetensors pads the header so the data section starts 8-byte aligned
WRITE_BUFFER = 16 << 20
WRITE_TODO = "check free space, file-size limits and permissions; nothing was published"


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FileLayout:
    header: bytes  # 8-byte length + JSON, padded
    size: int  # of the whole file


def tensor_digest(data: memoryview) -> str:
    """xxh3-64 of a tensor's bytes: fast enough (~7 GB/s) to check every weight while loading."""
    return xxhash.xxh3_64_hexdigest(data)


def split_into_parts(tensors: list[OutTensor], max_part_bytes: int) -> list[list[OutTensor]]:
    """Keep order; start a new part when the next tensor would pass the limit. Never an empty part; a
    tensor over the limit gets a part of its own."""
    parts: list[list[OutTensor]] = []
    size = 0
    for tensor in tensors:
        if not parts or (parts[-1] and size + tensor.nbytes > max_part_bytes):
            parts.append([])
            size = 0
        parts[-1].append(tensor)
        size += tensor.nbytes
    return parts


def layout(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> FileLayout:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    cursor = 0
    for t in tensors:
        offsets = [cursor, cursor + t.nbytes]
        entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": offsets}
        cursor += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGNMENT)
    header = len(blob).to_bytes(8, "little") + blob
    return FileLayout(header, len(header) + cursor)


class RankWriter:
    """Writes one rank's part files strictly in layout order with large buffered writes, checksumming
    as it goes (no second pass). Each `write` must be the next tensor of the layout, exactly.
    `metadata(part)` is the part file's safetensors metadata."""

    def __init__(
        self, directory: Path, rank: int, parts: list[list[OutTensor]], pattern: str,
        metadata: Callable[[int], dict[str, str]],
    ):
        self.files: dict[str, dict] = {}  # name -> {"rank", "part", "size", "crc32"}
        self.digests: dict[str, str] = {}  # tensor -> xxh3-64 of its bytes (checked by --verify loads)
        self._pending = [(pattern.format(rank=rank, part=n), tensors) for n, tensors in enumerate(parts)]
        self._directory, self._rank, self._metadata = directory, rank, metadata
        self._part = -1
        self._queue: list[OutTensor] = []
        self._file: BinaryIO | None = None
        self._crc = 0

    def _append(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        with failing_as("cannot write", self._file.name, WRITE_TODO):
            self._file.write(data)
        self._crc = crc32(data, self._crc)

    def _next_part(self) -> None:
        self._close_part()
        self._part += 1
        name, tensors = self._pending[self._part]
        plan = layout(tensors, self._metadata(self._part))
        self.files[name] = {"rank": self._rank, "part": self._part, "size": plan.size}
        with failing_as("cannot write", self._directory / name, WRITE_TODO):
            self._file = open(self._directory / name, "xb", buffering=WRITE_BUFFER)  # noqa: SIM115 (_close_part)
        self._crc = 0
        self._queue = list(tensors)
        self._append(plan.header)

    def _close_part(self) -> None:
        if self._file is not None:
            with failing_as("cannot write", self._file.name, WRITE_TODO):
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            self.files[self._pending[self._part][0]]["crc32"] = self._crc
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._queue:
            self._next_part()
        expected = self._queue.pop(0)
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype, expected.shape):
            raise RuntimeError(f"writer expected {expected}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = byte_view(tensor.contiguous())
        self.digests[name] = tensor_digest(data)
        self._append(data)

    def result(self) -> dict:
        """What the manifest needs from this rank: its files' records and each tensor's digest."""
        return {"files": self.files, "digests": self.digests}

    def close(self) -> None:
        """Finish the last part; refuse to end with tensors of the layout unwritten."""
        if self._queue or self._part != len(self._pending) - 1:
            raise RuntimeError(f"rank {self._rank}: layout not fully written")
        self._close_part()

    def abort(self) -> None:
        """Close an unfinished part (its staging directory is about to be removed: errors do not matter)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
