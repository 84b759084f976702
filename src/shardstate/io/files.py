"""Opening input files safely: only regular files. A FIFO or device in place of a weight, manifest or
config file would block `open` forever or never reach its end; it gets an OSError like any unreadable
file, so every caller's existing 'cannot read' message covers it."""

from __future__ import annotations

import errno
import os
import stat


def open_regular(path: str | os.PathLike[str], flags: int = 0) -> int:
    """os.open(path, O_RDONLY | flags) for a regular file; OSError(EINVAL) for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | flags)  # O_NONBLOCK: opening a FIFO returns at once
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    os.set_blocking(fd, True)
    return fd


def read_regular(path: str | os.PathLike[str], limit: int = 64 << 20) -> bytes:
    """The whole content of a small regular file (config, index, manifest); OSError(EFBIG) past `limit`
    bytes, before reading any."""
    with os.fdopen(open_regular(path), "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB", os.fspath(path))
        return f.read(limit + 1)[:limit]
