"""Where a writer (`convert`, `save`) may put a sharded state, and the staging directory it writes into.

shardstate never deletes or overwrites what it did not write. OUT must be a new path, or (with force)
a sharded state whose manifest says shardstate wrote it and accounts for every entry in it. Everything
else is refused whatever the flags, with what OUT is and what to do: the source or a directory holding
it, any other directory, a file, a symlink, a mount point, '.' or '..'.

Writes go to a hidden staging sibling of OUT (a marker inside says shardstate made it), published
atomically (io/publish.py). On any error or stop the staging directory is removed; if the writer dies
without a chance to (SIGKILL), a janitor process (io/janitor.py) removes it, and failing that the next
writer to OUT removes staging directories whose writer no longer runs."""

from __future__ import annotations

import contextlib
import os
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


def _refuse(what: str, out: Path, todo: str = YOURSELF) -> ShardstateError:
    return ShardstateError(f"output {what}", out, todo)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a directory"


def not_written_by_shardstate(out: Path) -> str | None:
    """Why the directory `out` is not wholly shardstate's work (None when it is: a sharded state whose
    manifest reads, and every entry of which is a regular file the manifest accounts for)."""
    try:
        manifest = read_manifest(out)
    except ShardstateError as exc:
        return "no shardstate.json" if "no shardstate.json" in exc.what else f"its {exc.what}"
    ours = manifest.names_written() | set(OWN_LEFTOVERS)
    with os.scandir(out) as entries:
        for entry in entries:
            if entry.name not in ours or not entry.is_file(follow_symlinks=False):
                return f"it holds '{entry.name}', which shardstate did not write"
    return None


def check_output(out: Path, src: Path, force: bool) -> bool:
    """Refuse an OUT that shardstate may not write; True when OUT is a sharded state to be replaced."""
    if out.name in ("", ".", ".."):
        raise _refuse(f"'{out}' is '.', '..' or a root, not a new directory", out, NEW_PATH)
    if out.is_symlink():
        target = os.readlink(out)
        dangling = "" if out.exists() else "dangling "
        raise _refuse(f"is a {dangling}symlink (to {target}); shardstate never writes through or replaces a link",
                      out, "choose a new path, or remove the link yourself")
    real_out, real_src = Path(os.path.realpath(out)), Path(os.path.realpath(src))
    if real_out == real_src:
        raise _refuse(f"is the source {src} itself", out, NEW_PATH)
    if real_out in real_src.parents:
        raise _refuse(f"is a directory holding the source {src}", out, NEW_PATH)
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(mode):
        raise _refuse(f"exists and is {_kind(mode)}", out)
    if os.path.ismount(out):
        raise _refuse("is a mount point", out, NEW_PATH)
    why = not_written_by_shardstate(out)
    if why is not None:
        raise _refuse(f"is a directory shardstate did not write ({why})", out)
    if not force:
        raise _refuse("is a sharded state already", out, "pass --force to replace it, or choose a new path")
    return True


def staging_path(out: Path) -> Path:
    return out.parent / f".{sibling_stem(out)}.tmp-{os.getpid()}"


def remove_stale_staging(out: Path) -> None:
    """Staging directories of OUT left by writers that no longer run (and that say they are shardstate's)."""
    for stale in out.parent.glob(f".{sibling_stem(out)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not (stale / STAGING_MARKER).is_file() or stale.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process


def remove_replaced(old: Path, names: set[str]) -> None:
    """Remove the previous OUT after it was swapped out: only the entries its manifest accounts for, then
    the directory; anything that appeared in it meanwhile is kept, and said so."""
    for name in (*(names - {MANIFEST_NAME}), MANIFEST_NAME):  # the manifest last: to the end it says "ours"
        with contextlib.suppress(FileNotFoundError):
            (old / name).unlink()
    try:
        old.rmdir()
    except OSError:
        print(f"warning: kept {old}: files appeared in the replaced output while writing; check and remove "
              "it yourself", file=sys.stderr)


def _as_in_out(path: Path, tmp: Path, out: Path) -> Path:
    """A path in the staging directory as the user knows it: under OUT."""
    return out / path.relative_to(tmp) if path == tmp or tmp in path.parents else path


def _write_error(exc: OSError, tmp: Path, out: Path) -> ShardstateError:
    """An OSError that escaped a writer, named for what failed: a write under the staging directory, else
    a read."""
    where = Path(exc.filename) if exc.filename else tmp
    if where == tmp or tmp in where.parents:
        return ShardstateError(f"cannot write ({exc.strerror})", _as_in_out(where, tmp, out),
                               "check free space, file-size limits and permissions; nothing was published")
    return ShardstateError(f"cannot read ({exc.strerror})", where, "check the file; nothing was published")


@contextlib.contextmanager
def staged_output(out: Path, src: Path, force: bool) -> Iterator[Path]:
    """A staging directory to write OUT's files into. On success it is fsynced and published atomically
    (OUT is never half-written, and when replaced never missing); on any error or stop it is removed,
    and an OSError becomes one ShardstateError naming the file."""
    out = Path(out)
    check_output(out, src, force)
    tmp = staging_path(out)
    ours = not os.path.lexists(tmp)  # decided before mkdir: a stop landing just after it still cleans up
    janitor = None
    try:
        with failing_as("cannot create a staging directory beside the output", out.parent,
                        "check permissions and free space"):
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(out)
            tmp.mkdir()
        (tmp / STAGING_MARKER).touch()
        janitor = Janitor(directory=tmp)
        on_default_death(tmp, lambda: shutil.rmtree(tmp, ignore_errors=True))
        yield tmp
        (tmp / STAGING_MARKER).unlink()
        fsync_dir(tmp)
        _publish_checked(tmp, out, src, force)
    except OSError as exc:
        if ours:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(exc, tmp, out) from None
    except ShardstateError as exc:
        if ours:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ShardstateError(exc.what, exc.where and _as_in_out(Path(exc.where), tmp, out), exc.todo) from None
    except BaseException:
        if ours:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        forget(tmp)
        if janitor is not None:
            janitor.dismiss()


def _publish_checked(tmp: Path, out: Path, src: Path, force: bool) -> None:
    replace = check_output(out, src, force)  # again: OUT may have changed while we wrote
    old_names = read_manifest(out).names_written() if replace else set()
    try:
        old = publish(tmp, out, replace)
    except FileExistsError:
        raise _refuse("appeared while this command was writing (another writer, or someone, created it)", out,
                      "it was left as it is; choose a new path, or check it and pass --force") from None
    except OSError as exc:
        raise ShardstateError(f"cannot publish the output ({exc.strerror})", out,
                              "check the directory; nothing was published") from None
    if old is not None:
        remove_replaced(old, old_names)
