"""Keyed cache entries: one sharded state per configuration, under a cache directory of their own (the vLLM
plugin's `--load-format shardstate` fills and reads them; `shardstate cache` lists, checks and removes them).

An entry is an ordinary sharded-state directory (rank files, side files, shardstate.json) plus `key.json`,
which says readably what configuration it holds (the fields its name's digest is taken over), which ranks'
files this directory holds (node-local caches hold their own ranks' only) and that shardstate wrote it.
Beside it, shardstate keeps `.NAME.lock` (flock: one builder at a time) and, while building,
`.NAME.building-TOKEN` (the staging directory, renamed into place when every rank's files and the manifest
are in it). Nothing else in the cache directory is touched: `rm` refuses what has no key.json of ours."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.manifest import MANIFEST_NAME, WRITER, read_manifest
from shardstate.format.strict_json import loads_strict
from shardstate.io.files import read_regular

KEY_NAME = "key.json"
KIND = "vllm-cache-entry"
KEY_VERSION = 1
MAX_KEY_BYTES = 1 << 20
ENTRY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}-[0-9a-f]{16}")
TODO = "check the cache directory's permissions and free space"


def key_digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_name(fields: dict) -> str:
    """`ARCHITECTURE-tpT-ppP-DIGEST16`: readable at a glance, unique by the digest of every field."""
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", str(fields.get("architecture", "model")))[:60]
    return f"{label}-tp{fields.get('tp_size')}-pp{fields.get('pp_size')}-{key_digest(fields)[:16]}"


@dataclass(frozen=True)
class CacheEntry:
    root: Path  # the cache directory
    name: str

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def lock_path(self) -> Path:
        return self.root / f".{self.name}.lock"

    def staging(self, token: str) -> Path:
        return self.root / f".{self.name}.building-{token}"

    def key(self) -> dict | None:
        """key.json, if this is an entry shardstate wrote (else None)."""
        return read_key(self.path)

    def holds(self, fields: dict, rank: int) -> bool:
        """Whether the entry is published for exactly `fields` and holds `rank`'s files (not whether they
        are intact: the load checks that as it reads)."""
        key = self.key()
        return (key is not None and key["fields"] == fields and rank in key["ranks"]
                and (self.path / MANIFEST_NAME).is_file())


def read_key(path: Path) -> dict | None:
    try:
        doc = loads_strict(read_regular(path / KEY_NAME, MAX_KEY_BYTES))
    except (OSError, ValueError, ShardstateError):
        return None
    if (not isinstance(doc, dict) or doc.get("writer") != WRITER or doc.get("kind") != KIND
            or not isinstance(doc.get("fields"), dict) or not isinstance(doc.get("ranks"), list)):
        return None
    return doc


def key_document(fields: dict, ranks: list[int]) -> dict:
    return {"writer": WRITER, "kind": KIND, "version": KEY_VERSION, "key": key_digest(fields), "fields": fields,
            "ranks": sorted(ranks), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class EntryLock:
    """An exclusive flock on the entry's lock file, taken without waiting: whoever holds it builds the
    entry; the others load without filling it. Released by `release` or when the process dies."""

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry
        self._fd: int | None = None

    def acquire(self) -> bool:
        with failing_as("cannot open the cache entry's lock", self.entry.lock_path, TODO):
            fd = os.open(self.entry.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sweep(entry: CacheEntry) -> None:
    """Remove what earlier builders of this entry left (their staging or replaced directories). Only with
    the entry's lock held: then no other process is building it."""
    for path in entry.root.glob(f".{entry.name}.*-*"):
        if path.is_dir() and not path.is_symlink() and path.name.startswith(
                (f".{entry.name}.building-", f".{entry.name}.replaced-")):
            shutil.rmtree(path, ignore_errors=True)


def publish(entry: CacheEntry, staging: Path, token: str) -> None:
    """Rename a finished staging directory into place (with the lock held). An entry there already (damaged,
    or refreshed) is moved aside first and then removed: it is ours (its key.json says so), or the rename
    is refused."""
    if entry.path.exists() or entry.path.is_symlink():
        if read_key(entry.path) is None or entry.path.is_symlink():
            raise ShardstateError("a directory shardstate did not write is where the cache entry goes", entry.path,
                                  "move it out of the cache directory")
        aside = entry.root / f".{entry.name}.replaced-{token}"
        os.rename(entry.path, aside)
        os.rename(staging, entry.path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staging, entry.path)
    with contextlib.suppress(OSError):
        fd = os.open(entry.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def touch(entry: CacheEntry) -> None:
    """Note a use (key.json's modification time is an entry's last use)."""
    with contextlib.suppress(OSError):
        os.utime(entry.path / KEY_NAME)


@dataclass(frozen=True)
class EntryInfo:
    name: str
    fields: dict
    ranks: list[int]  # the ranks whose files this directory holds
    bytes: int
    last_used: float
    complete: bool  # manifest present, every file of `ranks` present at its recorded size
    problem: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "fields": self.fields, "ranks": self.ranks, "bytes": self.bytes,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
                "complete": self.complete, "problem": self.problem}


def entries(root: Path) -> list[CacheEntry]:
    """The entries shardstate wrote in `root` (directories with our key.json), by name."""
    if not root.is_dir():
        return []
    return [CacheEntry(root, p.name) for p in sorted(root.iterdir())
            if not p.name.startswith(".") and p.is_dir() and not p.is_symlink() and read_key(p) is not None]


def describe(entry: CacheEntry) -> EntryInfo:
    key = entry.key()
    assert key is not None
    ranks = [r for r in key["ranks"] if isinstance(r, int)]
    size, problem = 0, None
    try:
        manifest = read_manifest(entry.path)
    except ShardstateError as exc:
        manifest, problem = None, exc.what
    if manifest is not None:
        for rank in ranks:
            for name in manifest.rank_files(rank):
                path = entry.path / name
                found = path.stat().st_size if path.is_file() else None
                if found != manifest.files[name]["size"]:
                    problem = problem or (f"{name} is missing" if found is None else f"{name} has size {found}, "
                                          f"the manifest says {manifest.files[name]['size']}")
                size += found or 0
    return EntryInfo(entry.name, key["fields"], ranks, size, (entry.path / KEY_NAME).stat().st_mtime,
                     problem is None, problem)


def find(root: Path, name: str) -> CacheEntry:
    """The entry `name` in `root`, refused in one line unless shardstate wrote it."""
    entry = CacheEntry(root, name)
    if name.startswith(".") or Path(name).name != name or not entry.path.is_dir() or entry.path.is_symlink():
        raise ShardstateError("no such cache entry", entry.path, "see `shardstate cache list`")
    if read_key(entry.path) is None:
        raise ShardstateError("not a cache entry shardstate wrote (no key.json of ours)", entry.path,
                              "shardstate removes only its own entries; remove it yourself if you mean to")
    return entry


def remove(entry: CacheEntry) -> None:
    """Remove one entry (ours: `find` checked) under its lock, so that no builder is replacing it meanwhile;
    refused while another process builds it."""
    lock = EntryLock(entry)
    if not lock.acquire():
        raise ShardstateError("the entry is being built by a running process", entry.path,
                              "try again when it has finished")
    try:
        aside = entry.root / f".{entry.name}.replaced-rm"
        with failing_as("cannot remove the cache entry", entry.path, TODO):
            os.rename(entry.path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        sweep(entry)
        with contextlib.suppress(OSError):
            entry.lock_path.unlink()
    finally:
        lock.release()
