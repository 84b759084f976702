"""Files of the node cache on their way in. Each is written to a temporary named for this host and
process (`.NAME.fetch-HOST-PID-STARTTIME-RANDOM`), fsynced and renamed into place, so a reader sees a
cache file whole or not at all. A cache may be shared by hosts (NFS), and only this host can tell
whether one of its processes is gone (processes.py: PID and start time): store/remote.py removes the
temporaries dead processes left.

A load does not wait for the cache: once a fetched file's bytes are in memory and their crc32 matched
the manifest, `write_in_background` hands them to a thread of this process, which writes them (it only
reads that memory: the loaded parameters alias it), fsyncs and renames each. Who waits for it:
- a spawned worker before it answers `close` (LLM.close), a torchrun rank before it exits (`settled`);
- any other process as it exits: the thread is not a daemon, so the interpreter (and multiprocessing's
  children, however started) waits for it. That covers the vLLM plugin's workers (no LLM.close there):
  vLLM stops them with SIGTERM turned into SystemExit, and their exit finishes the writes (a worker
  SIGKILLed after vLLM's grace period leaves its temporaries to the next run's clean-up).
A stop abandons the writes and removes their temporaries (`abandon`): a SIGTERM or SIGHUP left at its
default action (stops.on_default_death), or a stop unwinding through `settled`. A spawned worker is
SIGKILLed by its driver, which removes what it left (store/remote.py: remove_temporaries_of). A write
that fails (a full disk) is a warning: the load has its bytes, the next load fetches the file again."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from shardstate.errors import ShardstateError, failing_as
from shardstate.io.s3 import CACHE_TODO
from shardstate.processes import process_tag
from shardstate.stops import forget, on_default_death

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMPORARY = re.compile(r"\.(?P<name>.+)\.fetch-(?P<host>[0-9a-f]{8})-(?P<process>\d+-\d+)-[0-9a-f]{8}")
BLOCK = 8 << 20  # a background write's unit: an abandon takes effect between two


def temporary_name(name: str) -> str:
    return f".{name}.fetch-{HOST}-{process_tag()}-{secrets.token_hex(4)}"


class CacheFile:
    """One file of the cache being written: a temporary of its final size until `publish` fsyncs it and
    renames it into place; `discard` removes it (after a publish, nothing is left to remove)."""

    def __init__(self, directory: Path, name: str, size: int) -> None:
        self.path = directory / name
        self.temporary = directory / temporary_name(name)
        self.fd: int | None = None
        with failing_as("cannot write", self.temporary, CACHE_TODO):
            self.fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(self.fd, size)
            except BaseException:
                self.discard()
                raise

    def write(self, offset: int, data: memoryview) -> None:
        with failing_as("cannot write", self.temporary, CACHE_TODO):
            while data:
                written = os.pwrite(self.fd, data, offset)
                data, offset = data[written:], offset + written

    def publish(self) -> None:
        with failing_as("cannot write", self.path, CACHE_TODO):
            os.fsync(self.fd)
            os.replace(self.temporary, self.path)

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.temporary.unlink(missing_ok=True)


def open_cache_files(directory: Path, sizes: dict[str, int]) -> list[CacheFile]:
    """A temporary for each named file in `directory`; none left if one cannot be made."""
    files: list[CacheFile] = []
    try:
        for name, size in sizes.items():
            files.append(CacheFile(directory, name, size))
    except BaseException:
        for file in files:
            file.discard()
        raise
    return files


class _Writer(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="shardstate-cache-writes")  # not a daemon: the process's exit waits for it
        self.stopped = threading.Event()
        self.current: CacheFile | None = None

    def run(self) -> None:
        while (item := _next(self)) is not None:
            file, data = item
            try:
                view = memoryview(data.numpy())
                for at in range(0, len(view), BLOCK):
                    if self.stopped.is_set():
                        break
                    file.write(at, view[at : at + BLOCK])
                else:
                    file.publish()
            except ShardstateError as exc:
                if not self.stopped.is_set():
                    print(f"warning: the node cache keeps no copy of {file.path.name} ({exc}); the next load "
                          "fetches it again", file=sys.stderr)
            finally:
                file.discard()


_lock = threading.RLock()  # re-entrant: `abandon` may run in a signal handler while the main thread holds it
_pending: list[tuple[CacheFile, torch.Tensor]] = []
_writer: _Writer | None = None
_KEY = object()  # this module's clean-up, for stops.on_default_death


def _next(writer: _Writer) -> tuple[CacheFile, torch.Tensor] | None:
    """The writer's next file, or None when it is to end (nothing left, or abandoned)."""
    global _writer
    with _lock:
        writer.current = None
        if writer.stopped.is_set() or not _pending:
            if _writer is writer:
                _writer = None
                forget(_KEY)
            return None
        item = _pending.pop(0)
        writer.current = item[0]
        return item


def write_in_background(files: list[CacheFile], images: list[torch.Tensor]) -> None:
    """Each file's bytes (a uint8 CPU tensor, only read) written to its temporary, fsynced and renamed into
    place by this process's writer thread, in order."""
    global _writer
    with _lock:
        _pending.extend(zip(files, images, strict=True))
        if _writer is None:
            _writer = _Writer()
            _writer.start()
    on_default_death(_KEY, abandon)


def finish() -> None:
    """Return once every background write of this process is done."""
    while True:
        with _lock:
            writer = _writer
        if writer is None:
            return
        writer.join()


def abandon() -> None:
    """Stop the background writes and remove their temporaries now: the writer stops at its next block
    (its file's temporary is unlinked here already), the waiting files are discarded. Safe in a signal
    handler: it waits for nothing."""
    global _writer
    with _lock:
        waiting, _pending[:] = list(_pending), []
        if _writer is not None:
            _writer.stopped.set()
            if _writer.current is not None:
                _writer.current.temporary.unlink(missing_ok=True)
            _writer = None
        forget(_KEY)
    for file, _ in waiting:
        file.discard()


@contextlib.contextmanager
def settled() -> Iterator[None]:
    """Background writes started in the block are done when it ends; abandoned when an exception (a stop, a
    failure) leaves it."""
    try:
        yield
        finish()
    except BaseException:
        abandon()
        raise
