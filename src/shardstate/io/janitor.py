"""A tiny helper process that cleans up after a driver that dies without doing so itself (SIGKILL, the OOM
killer): it removes a staging directory, or kills a process group (benchmark peers and their workers).
The driver holds the write end of the helper's stdin; at EOF without the word "done" first, the driver
is gone and the helper acts. It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C reaches the whole process
group; the driver cleans up itself then) and runs only the standard library, so it starts in
milliseconds."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

_CODE = """
import os, shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
if sys.stdin.buffer.read() != b"done":
    kind, target = sys.argv[1:3]
    if kind == "group":
        try:
            os.killpg(int(target), signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 30
    while kind == "dir" and os.path.lexists(target) and time.monotonic() < deadline:  # ranks may still write
        shutil.rmtree(target, ignore_errors=True)
        time.sleep(0.05)
"""


class Janitor:
    """`Janitor(directory=D)` removes D, `Janitor(process_group=G)` kills group G, if the driver dies first."""

    def __init__(self, directory: Path | None = None, process_group: int | None = None) -> None:
        kind, target = ("dir", str(directory)) if directory is not None else ("group", str(process_group))
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CODE, kind, target],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def dismiss(self) -> None:
        """The driver finished (or cleaned up) itself: the helper leaves without touching anything."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.write(b"done")
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
