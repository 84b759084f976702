"""The storage protocol every reader goes through: a file is opened as a `FileReader` (its size, ranged
reads straight into a caller's buffer, how many reads suit it in flight). `LocalFile` is pread on a
regular file; io/s3.py's `ObjectFile` is ranged GETs on an object, and its `RemoteFiles` says which files
of a local directory (a node cache) are, for now, objects: the engine, the loaders and the header parser
ask the `ReadAccount` for a reader by path and never see the difference."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shardstate.io.files import open_regular


class FileReader(Protocol):
    where: str  # what messages name: a path, or an object's s3:// URL
    size: int
    parallel: int  # reads worth having in flight at once (the engine's threads for this file)
    remote: bool  # each read is a request: read big pieces, not many small ones

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill `buffer` from `offset`; the bytes read, fewer only where the file ends."""
        ...

    def close(self) -> None: ...


def pread_exact(fd: int, dest: memoryview, offset: int) -> int:
    """Fill `dest` from `fd` at `offset` (preadv until done or end of file); the bytes read."""
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class LocalFile:
    parallel = 1
    remote = False

    def __init__(self, path: Path, flags: int = 0):
        self.where = str(path)
        self.fd = open_regular(path, flags)
        self.size = os.fstat(self.fd).st_size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        return pread_exact(self.fd, buffer, offset)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class FetchReport:
    """What a load took from object storage, and what the node cache already held (checked)."""

    bytes_fetched: int = 0
    seconds: float = 0.0
    fetched: list[str] = field(default_factory=list)  # file names downloaded
    cached: list[str] = field(default_factory=list)  # file names the cache held, checked
