"""Publishing a finished directory atomically: Linux renameat2 with RENAME_NOREPLACE (a second writer
cannot land on top of a first) or RENAME_EXCHANGE (--force swaps old and new in one step, so OUT always
exists and is always whole). Elsewhere: plain renames."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from shardstate.errors import ShardstateError

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


def publish(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished `tmp` to `out`. Without `replace`, refuse if `out` appeared meanwhile."""
    try:
        if replace and out.exists():
            if _renameat2(tmp, out, RENAME_EXCHANGE):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous OUT
            else:
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        elif not _renameat2(tmp, out, RENAME_NOREPLACE):
            if out.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(out))
            os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ShardstateError("another writer created the output first", out,
                                  "it is complete; pass --force to replace it") from None
        raise ShardstateError(f"cannot publish the output ({exc.strerror})", out, "check the directory") from None
    fsync_dir(out.parent)
