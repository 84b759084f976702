"""Publishing a finished directory atomically: Linux renameat2 with RENAME_NOREPLACE (a second writer
cannot land on top of a first) or RENAME_EXCHANGE (replacing swaps old and new in one step, so OUT always
exists and is always whole). Elsewhere: plain renames.

What may be published or replaced is decided above this layer (store/output.py); this module only moves
directories and never deletes anything."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import signal
from pathlib import Path

from shardstate.stops import STOP_SIGNALS

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when the platform has no renameat2."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if function(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(code, os.strerror(code), str(dst))
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling_stem(out: Path) -> str:
    """A prefix for hidden siblings of OUT (staging directories) that stays within NAME_MAX whatever the
    length of OUT's own name: long names are cut and told apart by a hash."""
    name = out.name
    if len(name.encode()) <= 200:
        return name
    return name.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def publish(tmp: Path, out: Path, replace: bool) -> Path | None:
    """Move the finished `tmp` to `out`. With `replace`, `out` must exist: it is swapped out, and the path
    now holding the previous OUT is returned for the caller to remove. Without, FileExistsError if `out`
    appeared meanwhile."""
    if replace:
        if _renameat2(tmp, out, RENAME_EXCHANGE):
            old = tmp
        else:
            old = out.parent / f".{sibling_stem(out)}.old-{os.getpid()}"
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # no stop between the two renames
            try:
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except OSError:
                    os.rename(old, out)  # OUT is never left missing
                    raise
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    else:
        old = None
        if not _renameat2(tmp, out, RENAME_NOREPLACE):
            if os.path.lexists(out):
                raise FileExistsError(errno.EEXIST, "exists", str(out))
            os.rename(tmp, out)
    fsync_dir(out.parent)
    return old
