"""Page-cache control for cold runs: evict files with posix_fadvise(DONTNEED) and measure what stays
resident with fincore (util-linux)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (dirty pages written first). Mapped pages stay: unmap first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of `paths` in the page cache, or None without fincore."""
    if not paths or shutil.which("fincore") is None:
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        return None
    return sum(int(line) for line in result.stdout.split())
