"""crc32 of a file read in parallel ranges: each range's crc32 computed as it arrives (`Crc32Sink`, fed
by the engine), then combined in file order (zlib's crc32_combine, which Python's zlib does not expose):
the crc32 register is linear over GF(2), so appending `n` bytes maps the first part's crc through a
fixed 32x32 bit matrix."""

from __future__ import annotations

import functools
import threading
import zlib
from pathlib import Path

POLY = 0xEDB88320  # crc32's reflected polynomial


def _times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _compose(a: list[int], b: list[int]) -> list[int]:
    """The matrix of `a` applied after `b`."""
    return [_times(a, column) for column in b]


@functools.lru_cache(maxsize=16)
def _shift(length: int) -> list[int]:
    """The map taking a crc32 register across `length` zero bytes."""
    base = [POLY] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):
        base = _compose(base, base)  # two, four, eight bits: one byte
    result = [1 << n for n in range(32)]
    while length:
        if length & 1:
            result = _compose(base, result)
        base = _compose(base, base)
        length >>= 1
    return result


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """crc32(a + b) from crc32(a), crc32(b) and len(b)."""
    return _times(_shift(length2), crc1) ^ crc2


class Crc32Sink:
    """A ByteSink (io/engine.py) that keeps the crc32 of every piece fed, from any reader thread, and
    combines them per file in file order."""

    def __init__(self) -> None:
        self.pieces: dict[str, list[tuple[int, int, int]]] = {}  # name -> (offset, length, crc32)
        self.lock = threading.Lock()

    def feed(self, path: Path, offset: int, data: memoryview) -> None:
        piece = (offset, len(data), zlib.crc32(data))
        with self.lock:
            self.pieces.setdefault(path.name, []).append(piece)

    def crc(self, name: str, size: int) -> int:
        """The crc32 of the whole file `name`, of `size` bytes, all fed."""
        crc, end = 0, 0
        for offset, length, part in sorted(self.pieces.get(name, [])):
            if offset != end:
                raise RuntimeError(f"{name}: bytes {end}..{offset} never arrived")  # an engine bug, not input
            crc, end = crc32_combine(crc, part, length), end + length
        if end != size:
            raise RuntimeError(f"{name}: {end} of {size} bytes arrived")
        return crc
