"""Memory of this process and of this host, as /proc reports it."""

from __future__ import annotations

import os
import resource


def _proc_kib(path: str, key: str) -> int | None:
    """The 'key:  N kB' line of a /proc file, in bytes (None where /proc or the line is missing)."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """VmHWM from /proc (reset at exec, so a spawned worker does not inherit its parent's peak, as
    ru_maxrss does on Linux); ru_maxrss where /proc is missing."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def available_memory_bytes() -> int | None:
    """MemAvailable: what can still be allocated without swapping (None if unknown)."""
    return _proc_kib("/proc/meminfo", "MemAvailable")
