"""Whether a process of this host still runs (for removing what dead processes left behind).

A process is named by its PID *and* its start time: PIDs are reused, so a temporary named by PID alone
would be kept for ever once another process took that PID (and a reboot restarts the numbering)."""

from __future__ import annotations

import os
import re

TAG = re.compile(r"(?P<pid>\d+)-(?P<started>\d+)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (/proc/PID/stat's 22nd field); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or parentheses
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])


def process_tag(pid: int | None = None) -> str:
    """`PID-STARTTIME` of this process (or `pid`), for names of what it leaves while it runs."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_time(pid) or 0}"


def tag_alive(tag: str) -> bool:
    """Whether the process `process_tag` named still runs: same PID, same start time. A tag in another
    form is taken as alive (not ours to judge)."""
    match = TAG.fullmatch(tag)
    if match is None:
        return True
    pid = int(match["pid"])
    if not os.path.exists("/proc/self/stat"):  # no procfs: the PID is all there is to go on
        return alive(pid)
    return start_time(pid) == int(match["started"])
