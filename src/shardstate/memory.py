"""Peak resident memory of this process."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """VmHWM from /proc (reset at exec, so a spawned worker does not inherit its parent's peak, as
    ru_maxrss does on Linux); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
