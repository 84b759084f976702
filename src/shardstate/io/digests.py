"""--verify in one pass: each tensor's xxh3-64 is computed from the bytes just read, while they are still
in cache, instead of re-reading every parameter after the load. The engine feeds every byte range it
reads; each tensor's bytes must arrive in file order (the engine's chunks start on tensor boundaries
when a check is attached, so reader threads never share a tensor)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from pathlib import Path

import xxhash

from shardstate.errors import ShardstateError


@dataclass(frozen=True)
class Expected:
    name: str
    begin: int  # byte range in the file
    end: int
    xxh3_64: str  # hex, as the writer recorded it


def digest_mismatch(name: str, path: Path) -> ShardstateError:
    return ShardstateError(
        f"tensor '{name}' does not match its checksum", path,
        "the file or its manifest changed since it was written: re-create the sharded state "
        "(`shardstate verify DIR` lists every bad file)",
    )


class _FileDigests:
    def __init__(self, path: Path, tensors: list[Expected]):
        self.path = path
        self.tensors = sorted(tensors, key=lambda t: t.begin)
        self.begins = [t.begin for t in self.tensors]
        self.hashers = [xxhash.xxh3_64() for _ in self.tensors]
        self.fed = [0] * len(self.tensors)

    def feed(self, offset: int, data: memoryview) -> int:
        """Update every tensor that [offset, offset+len) overlaps; return how many it completed."""
        end = offset + len(data)
        index = max(0, bisect.bisect_right(self.begins, offset) - 1)
        completed = 0
        while index < len(self.tensors) and self.tensors[index].begin < end:
            tensor = self.tensors[index]
            lo, hi = max(offset, tensor.begin), min(end, tensor.end)
            if lo < hi:
                if lo != tensor.begin + self.fed[index]:
                    raise RuntimeError(f"bytes of '{tensor.name}' fed out of order")  # an engine bug, not input
                self.hashers[index].update(data[lo - offset : hi - offset])
                self.fed[index] += hi - lo
                if self.fed[index] == tensor.end - tensor.begin:
                    if self.hashers[index].hexdigest() != tensor.xxh3_64:
                        raise digest_mismatch(tensor.name, self.path)
                    completed += 1
            index += 1
        return completed


class StreamingDigests:
    """The expected digests of the tensors of some files, checked as their bytes are read."""

    def __init__(self, expected: dict[Path, list[Expected]]):
        self._files = {path: _FileDigests(path, tensors) for path, tensors in expected.items()}
        self._lock = threading.Lock()
        self._checked = 0
        self._total = sum(len(tensors) for tensors in expected.values())

    def boundaries(self, path: Path) -> list[int]:
        """Where tensors of `path` begin and end: the places a reader may start a new chunk."""
        file = self._files.get(path)
        return sorted({b for t in file.tensors for b in (t.begin, t.end)}) if file else []

    def feed(self, path: Path, offset: int, data: memoryview) -> None:
        file = self._files.get(path)
        if file is not None:
            done = file.feed(offset, data)
            with self._lock:
                self._checked += done

    def finish(self) -> None:
        """Every expected tensor was fed whole (a gap would be a tensor loaded unchecked)."""
        if self._checked != self._total:
            raise RuntimeError(f"--verify checked {self._checked} of {self._total} tensors")
