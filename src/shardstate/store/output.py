"""Where a writer (`convert`, `save`) may put a sharded state, and the staging directory it writes into.

shardstate never deletes or overwrites what it did not write. OUT must be a new path, or (with force)
a sharded state whose manifest says shardstate wrote it and accounts for every entry in it. Everything
else is refused whatever the flags, with what OUT is and what to do: the source or a directory holding
it, any other directory, a file, a symlink, a mount point, '.' or '..'.

Writes go to a hidden staging sibling of OUT, published atomically (io/publish.py). A marker file inside
says shardstate made it, and its writer holds an flock on the marker for as long as it runs. On any
error or stop the staging directory is removed; if the writer dies without a chance to (SIGKILL), a
janitor process (io/janitor.py) removes it, and failing that the next writer to OUT removes staging
directories whose marker is no longer locked (their writer is gone, on whatever host it ran)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.manifest import MANIFEST_NAME, read_manifest
from shardstate.io.janitor import Janitor
from shardstate.io.publish import fsync_dir, publish, sibling_stem
from shardstate.stops import forget, on_default_death

STAGING_MARKER = ".shardstate-staging"  # inside a staging directory only: "shardstate made this"
OWN_LEFTOVERS = (f".{MANIFEST_NAME}.tmp",)  # what a writer killed while writing the manifest leaves
NEW_PATH = "choose a new path"
YOURSELF = "choose a new path, or remove it yourself if you no longer need it"


def _refuse(out: Path, what: str, todo: str = YOURSELF) -> ShardstateError:
    return ShardstateError(f"output {out} {what}", None, todo)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a directory"


def reason_not_ours(out: Path) -> str | None:
    """Why the directory `out` is not wholly shardstate's work; None when it is (a sharded state whose
    manifest reads, every entry of which is a regular file the manifest accounts for)."""
    try:
        manifest = read_manifest(out)
    except ShardstateError as exc:
        return "no shardstate.json" if "no shardstate.json" in exc.what else f"its {exc.what}"
    ours = manifest.names_written() | set(OWN_LEFTOVERS)
    with os.scandir(out) as entries:
        for entry in entries:
            if entry.name not in ours or not entry.is_file(follow_symlinks=False):
                return f"it holds {entry.name!r}, which shardstate did not write"
    return None


def check_output(out: Path, src: Path, force: bool) -> bool:
    """Refuse an OUT that shardstate may not write; True when OUT is a sharded state to be replaced."""
    with failing_as("cannot examine the output", out, "check the permissions of its directory"):
        return _check_output(out, src, force)


def _check_output(out: Path, src: Path, force: bool) -> bool:
    if out.name in ("", ".", ".."):
        raise _refuse(out, "is '.', '..' or a root, not a new directory", NEW_PATH)
    if out.is_symlink():
        dangling = "" if out.exists() else "dangling "
        raise _refuse(out, f"is a {dangling}symlink (to {os.readlink(out)}); shardstate never writes through or "
                           "replaces a link", "choose a new path, or remove the link yourself")
    real_out, real_src = Path(os.path.realpath(out)), Path(os.path.realpath(src))
    if real_out == real_src:
        raise _refuse(out, "is the source itself", NEW_PATH)
    if real_out in real_src.parents:
        raise _refuse(out, f"is a directory holding the source {src}", NEW_PATH)
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(mode):
        raise _refuse(out, f"exists and is {_kind(mode)}")
    if os.path.ismount(out):
        raise _refuse(out, "is a mount point", NEW_PATH)
    why = reason_not_ours(out)
    if why is not None:
        raise _refuse(out, f"is a directory shardstate did not write ({why})")
    if not force:
        raise _refuse(out, "is a sharded state already", "pass --force to replace it, or choose a new path")
    return True


def staging_path(out: Path) -> Path:
    """A fresh hidden sibling of OUT: the writer's pid and a random tag (two hosts may share a pid)."""
    return out.parent / f".{sibling_stem(out)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _writer_gone(marker: Path) -> bool:
    """Whether the marker's writer no longer holds its lock (only a live writer does)."""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_staging(out: Path) -> None:
    """Staging directories of OUT whose writer is gone (and that say they are shardstate's)."""
    name = re.compile(re.escape(f".{sibling_stem(out)}.tmp-") + r"\d+-[0-9a-f]{8}")
    for stale in out.parent.iterdir():
        if name.fullmatch(stale.name) and not stale.is_symlink() and _writer_gone(stale / STAGING_MARKER):
            shutil.rmtree(stale, ignore_errors=True)


def remove_replaced(old: Path, names: set[str]) -> None:
    """Remove the previous OUT after it was swapped out: only the entries its manifest accounts for (through
    a descriptor of the directory itself, never through a link put in its place), then the directory.
    Whatever cannot go (a file that appeared meanwhile, a file that may not be removed) is kept, and said
    so; never an error, since the new OUT is already in place."""
    problem = None
    try:
        directory = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        directory, problem = None, exc.strerror
    if directory is not None:
        try:
            for name in (*(names - {MANIFEST_NAME}), MANIFEST_NAME):  # the manifest last: it says "ours" to the end
                try:
                    os.unlink(name, dir_fd=directory)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    problem = problem or f"{name}: {exc.strerror}"
        finally:
            os.close(directory)
        try:
            old.rmdir()
            return
        except OSError as exc:
            problem = problem or ("it holds files that appeared meanwhile" if exc.errno == errno.ENOTEMPTY
                                  else exc.strerror)
    print(f"warning: the output was replaced, but its previous version is kept at {old} ({problem}); "
          "check and remove it yourself", file=sys.stderr)


def _as_in_out(text: str, tmp: Path, out: Path) -> str:
    """Paths in the staging directory, as the user knows them: under OUT."""
    return text.replace(str(tmp), str(out))


def _write_error(exc: OSError, tmp: Path, out: Path) -> ShardstateError:
    """An OSError that escaped a writer, named for what failed: a write under the staging directory, else
    a read."""
    where = Path(exc.filename) if exc.filename else tmp
    if where == tmp or tmp in where.parents:
        return ShardstateError(f"cannot write ({exc.strerror})", _as_in_out(str(where), tmp, out),
                               "check free space, file-size limits and permissions; nothing was published")
    return ShardstateError(f"cannot read ({exc.strerror})", where, "check the file; nothing was published")


@contextlib.contextmanager
def staged_output(out: Path, src: Path, force: bool) -> Iterator[Path]:
    """A staging directory to write OUT's files into. On success it is fsynced and published atomically
    (OUT is never half-written, and when replaced never missing); on any error or stop before that it is
    removed, and an OSError becomes one ShardstateError naming the file."""
    check_output(Path(out), src, force)
    out = Path(out).absolute()  # the process may change directory while it writes; its workers do not
    tmp = staging_path(out)
    ours = not os.path.lexists(tmp)  # decided before mkdir, so that a stop landing just after it still cleans up
    old, old_names, published, lock = None, set(), False, None
    janitor = None
    if ours:  # before mkdir: a SIGTERM/SIGHUP landing between mkdir and the janitor's start still removes it
        on_default_death(tmp, lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        with failing_as("cannot create a staging directory beside the output", out.parent,
                        "check permissions and free space"):
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(out)
            tmp.mkdir()
            lock = os.open(tmp / STAGING_MARKER, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)
        janitor = Janitor(directory=tmp)
        yield tmp
        (tmp / STAGING_MARKER).unlink()
        fsync_dir(tmp)
        replace = check_output(out, src, force)  # again: OUT may have changed while we wrote
        old_names = read_manifest(out).names_written() if replace else set()
        old = _publish(tmp, out, replace)
        published = True
        if old is not None:
            remove_replaced(old, old_names)
    except BaseException as exc:
        if published:  # only a stop can land here: finish removing the previous version, never the new one
            if old is not None and old.exists():
                remove_replaced(old, old_names)
        elif ours:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(exc, tmp, out) from None
        if isinstance(exc, ShardstateError):
            raise ShardstateError(_as_in_out(exc.what, tmp, out), exc.where and _as_in_out(exc.where, tmp, out),
                                  exc.todo) from None
        raise
    finally:
        if lock is not None:
            os.close(lock)
        forget(tmp)
        if janitor is not None:
            janitor.dismiss()


def _publish(tmp: Path, out: Path, replace: bool) -> Path | None:
    try:
        return publish(tmp, out, replace)
    except FileExistsError:
        raise _refuse(out, "appeared while this command was writing (another writer, or someone, created it)",
                      "it was left as it is; choose a new path, or check it and pass --force") from None
    except OSError as exc:
        raise ShardstateError(f"cannot publish the output ({exc.strerror})", out,
                              "check the directory; nothing was published") from None
