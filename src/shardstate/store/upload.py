"""`shardstate upload DIR s3://bucket/prefix`: a complete sharded state into object storage.

In this order, so that a reader never sees half a state and nothing is left that cannot be told apart:
1. Checks, before any request: DIR passes what `shardstate verify` checks (manifest, config.json, every
   rank file's header, tensors, size and checksum), and its side files and manifest are present and
   regular files inside DIR (a FIFO is never opened; a link leading outside would publish its target).
   Then, with reads only: the prefix lies inside no other state (no manifest or upload marker at a parent
   prefix), holds no state below it, and is empty or holds an unfinished upload of this very state.
2. The marker `.shardstate-upload.json` (this state's id) first: whatever an upload that never finished
   leaves at the prefix (a SIGKILL, a lost network) is named by it as this state's, and is shardstate's.
3. The rank files and side files, `parallel` requests in flight, a file larger than one part sent in
   parts (SHARDSTATE_S3_PART_MIB, default 16 MiB) by this module's own loop, so that a stop is seen
   between any two parts.
4. The manifest last; then the marker is removed.

The same upload run again over an unfinished one resumes it: the multipart uploads it left open are
aborted, the objects already whole are kept, the rest are sent. An object is put with its state id and
crc32 as metadata (`x-amz-meta-shardstate-state`, `-crc32`), and a file's multipart upload is completed
only once the crc32 of the parts sent equals the manifest's; so an object of the manifest's size whose
metadata names this state and the manifest's crc32 holds exactly that file: one HEAD tells, where
reading it back would cost the whole upload again (an ETag is no checksum of ours: it is a digest of
parts for a multipart object).

A stop (SIGINT, SIGTERM, SIGHUP) ends the transfers at the next part, without waiting for the files
queued; this run's multipart uploads are aborted and the objects it put deleted (the marker last), so the
prefix is as the run found it; the stop's line says so, or exactly what could not be removed. A failure
(the server, a file changed meanwhile) aborts the multipart uploads in flight and keeps the files
already up, for the same upload to resume; so does a program using this module that dies of a signal
(no clean-up runs there: what it leaves is what a SIGKILL leaves)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from shardstate.errors import ShardstateError, brief, failing_as
from shardstate.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from shardstate.format.sharded_state import check_inside, open_sharded_state
from shardstate.format.strict_json import loads_strict
from shardstate.io.crc32 import crc32, crc32_combine
from shardstate.io.files import open_regular, read_regular
from shardstate.io.s3 import DEFAULT_RANGES, S3Location, S3Store, is_s3
from shardstate.io.storage import pread_exact
from shardstate.state_info import verify_state
from shardstate.stops import Stopped

MARKER_NAME = ".shardstate-upload.json"  # hidden: no reader takes it for a file of the state
MARKER_FORMAT = "shardstate-upload"
STATE_KEY, CRC_KEY = "shardstate-state", "shardstate-crc32"  # object metadata
PART_ENV = "SHARDSTATE_S3_PART_MIB"
DEFAULT_PART_MIB, MIN_PART_MIB, MAX_PART_MIB = 16, 5, 5 << 10  # S3 takes parts of 5 MiB to 5 GiB
MAX_PARTS = 10_000  # S3's limit per object: a larger file gets larger parts
SOURCE_TODO = "run `shardstate verify` and re-create the state; nothing was uploaded"


def part_bytes() -> int:
    """The size of a multipart upload's parts: $SHARDSTATE_S3_PART_MIB MiB (5..5120), default 16. Smaller
    parts stop sooner and hold less memory (one per request in flight); larger ones make fewer requests."""
    text = os.environ.get(PART_ENV)
    if text is None:
        return DEFAULT_PART_MIB << 20
    if not text.isdigit() or not MIN_PART_MIB <= int(text) <= MAX_PART_MIB:
        raise ShardstateError(f"{PART_ENV}={brief(text)} is not an integer from {MIN_PART_MIB} to {MAX_PART_MIB}",
                              None, f"set it to the part size in MiB, or unset it (default {DEFAULT_PART_MIB})")
    return int(text) << 20


def check_source(directory: str | os.PathLike[str]) -> Manifest:
    """Everything upload will send, checked without a request: what `verify` refuses, and side files (and
    the manifest) missing, not regular files, or leading outside DIR."""
    if is_s3(directory):
        raise ShardstateError(f"{brief(os.fspath(directory), 200)} is an s3:// location, not a local directory",
                              None, "give the directory of a sharded state on this machine")
    root = Path(directory)
    manifest = open_sharded_state(root).manifest  # no manifest (incomplete, or not a state): refused
    assert manifest is not None
    bad = [check for check in verify_state(root) if not check.ok]
    if bad:
        name, problem = bad[0].name, bad[0].problem or ""
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise ShardstateError(f"{problem if problem.startswith(name) else f'{name}: {problem}'}{more}", root,
                              SOURCE_TODO)
    for name in (*manifest.side_files, MANIFEST_NAME):
        path = root / name
        if not os.path.lexists(path):
            raise ShardstateError(f"side file {name} is missing", root, "restore it from the source, or re-create "
                                  "the state; nothing was uploaded")
        check_inside(path, root)
        if not path.is_file():  # a FIFO, a device, a directory, a dangling link: never opened
            raise ShardstateError(f"{name} is not a regular file", root, "replace it with the file itself; "
                                  "nothing was uploaded")
    return manifest


@dataclass
class Prefix:
    """What the prefix holds that an upload goes on from."""

    resuming: bool = False  # it holds an unfinished upload of this state (its marker)
    kept: list[str] = field(default_factory=list)  # this state's rank files already whole there
    stale: list[tuple[str, str]] = field(default_factory=list)  # multipart uploads an earlier run left open


def check_destination(url: str, manifest: Manifest | None = None, parallel: int = DEFAULT_RANGES) -> (
        tuple[S3Store, Prefix]):
    """The store of `url` and what it holds, refused unless an upload of `manifest`'s state may write there
    (reads only; but a marker left beside a finished upload of this same state is removed: it is its own).
    `manifest` None (convert, before its state exists): an unfinished upload of any state passes; the
    upload itself checks that it is of the same state."""
    store = S3Store(S3Location.parse(url))
    location = store.location
    _refuse_nesting(store)
    objects = store.objects()
    below = sorted(n for n in objects if "/" in n and n.rsplit("/", 1)[1] in (MANIFEST_NAME, MARKER_NAME))
    if below:
        where, name = below[0].rsplit("/", 1)
        what = "a sharded state" if name == MANIFEST_NAME else "an unfinished upload"
        raise ShardstateError(f"{location.url()} holds {what} below it, at {location.url(where)}", None,
                              "upload to a prefix of its own")
    state_id = manifest.state_id if manifest is not None else None
    if MANIFEST_NAME in objects:
        if state_id is not None and _state_named(store, MANIFEST_NAME, objects) == state_id:
            if _state_named(store, MARKER_NAME, objects) == state_id:
                store.delete(MARKER_NAME)  # left by an upload killed right after its manifest: its own
            raise ShardstateError(f"{location.url()} already holds this state (state {state_id})", None,
                                  "nothing to upload")
        raise ShardstateError(f"{location.url()} already holds {len(objects)} object(s) (e.g. {brief(min(objects))})",
                              None, "upload to a new prefix; shardstate never overwrites what it did not write")
    uploads = store.multipart_uploads()
    if MARKER_NAME not in objects:
        if objects:
            raise ShardstateError(f"{location.url()} already holds {len(objects)} object(s) (e.g. "
                                  f"{brief(min(objects))}) and no manifest: an upload that did not finish, or "
                                  "someone else's objects", None,
                                  "delete them if they are a stopped upload's, or upload to a new prefix")
        if uploads:
            raise ShardstateError(f"{location.url()} has an upload in progress that is not shardstate's (to "
                                  f"{brief(uploads[0][0])})", None, "let it finish, or upload to a new prefix")
        return store, Prefix()
    marker = _state_named(store, MARKER_NAME, objects)
    if marker is None:
        raise ShardstateError(f"{location.url(MARKER_NAME)} is not a marker shardstate wrote", None,
                              "upload to a new prefix")
    if state_id is None:
        return store, Prefix(resuming=True)
    if marker != state_id:
        raise ShardstateError(f"{location.url()} holds an unfinished upload of another state ({marker})", None,
                              "upload that state again to finish it, or delete its objects; or upload to a new "
                              "prefix")
    ours = {MARKER_NAME, *manifest.files, *manifest.side_files}
    foreign = sorted({*objects, *(name for name, _ in uploads)} - ours)
    if foreign:
        raise ShardstateError(f"{location.url()} holds {brief(foreign[0])}, which is not this state's", None,
                              "upload to a new prefix")
    candidates = [n for n in sorted(manifest.files) if n in objects and objects[n].size == manifest.files[n]["size"]]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        metadata = list(pool.map(store.metadata, candidates))
    kept = [name for name, meta in zip(candidates, metadata, strict=True)
            if meta.get(STATE_KEY) == state_id and meta.get(CRC_KEY) == f"{manifest.files[name]['crc32']:08x}"]
    return store, Prefix(resuming=True, kept=kept, stale=uploads)


def _refuse_nesting(store: S3Store) -> None:
    """A prefix inside another state's (a manifest or an upload marker at a parent prefix) is refused: a
    reader of that state would list this one's objects as its own."""
    location = store.location
    parts = location.prefix.split("/") if location.prefix else []
    for depth in range(len(parts)):
        parent = store.at("/".join(parts[:depth]))
        for name in (MANIFEST_NAME, MARKER_NAME):
            if parent.exists(name):
                what = "a sharded state" if name == MANIFEST_NAME else "an unfinished upload"
                raise ShardstateError(f"{location.url()} is inside {parent.location.url()}, which holds {what} "
                                      f"({name})", None, "upload to a prefix outside it")


def _state_named(store: S3Store, name: str, objects: dict) -> str | None:
    """The state id that a manifest or marker object names; None if it is absent or names none."""
    if name not in objects or objects[name].size > MAX_MANIFEST_BYTES:
        return None
    try:
        doc = loads_strict(store.read_bytes(name, MAX_MANIFEST_BYTES))  # nested past the parser: ValueError
    except ValueError:
        return None
    if not isinstance(doc, dict) or (name == MARKER_NAME and doc.get("format") != MARKER_FORMAT):
        return None
    return doc.get("state_id") if isinstance(doc.get("state_id"), str) else None


class Outgoing:
    """One local file on its way: read part by part (opened at its first part, closed after its last),
    its parts' crc32s and ETags gathered for completing."""

    def __init__(self, root: Path, name: str, crc: int | None, part_size: int):
        self.name, self.path, self.crc = name, root / name, crc
        with failing_as("cannot read", self.path, SOURCE_TODO):
            self.size = os.stat(self.path).st_size
        self.part_size = max(part_size, -(-self.size // MAX_PARTS))
        self.parts = max(1, -(-self.size // self.part_size))
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.upload_id: str | None = None
        self.etags: list[str] = [""] * self.parts
        self.crcs: list[int] = [0] * self.parts
        self.left = self.parts

    def changed(self) -> ShardstateError:
        return ShardstateError(f"{self.name} changed while it was uploaded", self.path.parent,
                               "let whatever writes to the state finish, and verify it")

    def read(self, part: int) -> bytearray:
        with self.lock:
            if self.fd is None:
                with failing_as("cannot read", self.path, SOURCE_TODO):
                    self.fd = open_regular(self.path)
                if os.fstat(self.fd).st_size != self.size:
                    raise self.changed()
            fd = self.fd
        start = part * self.part_size
        data = bytearray(min(self.part_size, self.size - start))
        with failing_as("cannot read", self.path, SOURCE_TODO):
            got = pread_exact(fd, memoryview(data), start)
        if got != len(data):
            raise self.changed()
        self.crcs[part] = crc32(data)
        return data

    def whole_crc(self) -> int:
        crc = 0
        for part, part_crc in enumerate(self.crcs):
            crc = crc32_combine(crc, part_crc, min(self.part_size, self.size - part * self.part_size))
        return crc

    def check(self) -> None:
        """The bytes sent are the manifest's (when it has the file's crc32), before the object appears."""
        if self.crc is not None and self.whole_crc() != self.crc:
            raise self.changed()

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class Transfer:
    """This run's requests, and what it has put: what a stop takes back."""

    def __init__(self, store: S3Store, root: Path, state_id: str, parallel: int, part_size: int):
        self.store, self.root, self.state_id = store, root, state_id
        self.parallel, self.part_size = parallel, part_size
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.put: list[str] = []  # objects this run sent, whole or completed (noted before the request)
        self.open: dict[str, str] = {}  # this run's multipart uploads not completed: name -> upload id
        self.sent = 0  # bytes

    def put_object(self, name: str, data: bytes | bytearray, metadata: dict[str, str], if_absent: bool = False) -> None:
        with self.lock:
            self.put.append(name)
        try:
            self.store.put(name, data, metadata, if_absent)
        except ShardstateError:
            if if_absent:  # refused because someone else's object is there: not this run's to take back
                with self.lock:
                    self.put.remove(name)
            raise

    def send(self, names: list[str], crcs: dict[str, int]) -> None:
        """Files of DIR, `parallel` requests in flight, in order; each a single PUT or parts."""
        files = [Outgoing(self.root, name, crcs.get(name), self.part_size) for name in names]
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="upload")
        try:
            futures = [pool.submit(self._part, file, part) for file in files for part in range(file.parts)]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                if future.done() and future.exception() is not None:
                    raise future.exception()
        except BaseException:
            self.stop.set()  # the parts in flight end; none starts
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for file in files:
                file.close()

    def _part(self, file: Outgoing, part: int) -> None:
        if self.stop.is_set():
            return
        data = file.read(part)
        metadata = {STATE_KEY: self.state_id, **({CRC_KEY: f"{file.crc:08x}"} if file.crc is not None else {})}
        if file.parts == 1:
            file.close()
            file.check()
            self.put_object(file.name, data, metadata)
        else:
            with file.lock:
                if file.upload_id is None:
                    file.upload_id = self.store.start_multipart(file.name, metadata)
                    with self.lock:
                        self.open[file.name] = file.upload_id
            file.etags[part] = self.store.put_part(file.name, file.upload_id, part + 1, data)
            with file.lock:
                file.left -= 1
                last = file.left == 0
            if last:
                file.check()
                with self.lock:
                    self.put.append(file.name)
                self.store.complete_multipart(file.name, file.upload_id, file.etags)
                with self.lock:
                    del self.open[file.name]
                file.close()
        with self.lock:
            self.sent += len(data)

    def abort_open(self) -> None:
        """This run's multipart uploads in flight aborted (after a failure: they cannot be resumed)."""
        for name, upload_id in list(self.open.items()):
            try:
                self.store.abort_multipart(name, upload_id)
            except ShardstateError:
                return  # the server is unreachable: the same upload run again aborts them
            del self.open[name]

    def take_back(self, found: Prefix) -> str:
        """After a stop: this run's multipart uploads aborted, the objects it put deleted, the marker last
        (so that whatever could not be removed stays named as this state's). What is left, in words."""
        url = self.store.location.url()
        steps = [(name, upload_id) for name, upload_id in self.open.items()]
        steps += [(name, None) for name in reversed(self.put) if name != MARKER_NAME]
        steps += [(MARKER_NAME, None)] if MARKER_NAME in self.put else []
        for done, (name, upload_id) in enumerate(steps):
            try:
                if upload_id is None:
                    self.store.delete(name)
                else:
                    self.store.abort_multipart(name, upload_id)
            except ShardstateError as exc:  # e.g. the server gone: say what stays, try nothing more
                left = steps[done:]
                uploads = sum(1 for _, upload_id in left if upload_id is not None)
                objects = [name for name, upload_id in left if upload_id is None]
                held = ", ".join(filter(None, [f"{len(objects)} object(s) ({brief(', '.join(objects), 120)})"
                                               if objects else "", f"{uploads} open multipart upload(s)"
                                               if uploads else ""]))
                return (f"upload aborted, but {url} still holds {held} ({exc.what}): the same upload run again "
                        "finishes it")
        if found.resuming:
            return (f"upload aborted; {url} keeps the unfinished upload of this state it held before: the same "
                    "upload run again finishes it")
        return f"upload aborted, nothing left at {url}"


@dataclass(frozen=True)
class UploadReport:
    url: str
    files: list[str]  # sent by this run, the manifest last
    kept: list[str]  # already at the prefix, whole, from an unfinished upload of this state
    bytes_uploaded: int
    seconds: float


def upload_state(directory: str | os.PathLike[str], url: str, parallel: int = DEFAULT_RANGES) -> UploadReport:
    """Upload the sharded state in `directory` to `url` (see the module's docstring): checked first,
    resumed where an unfinished upload of it is there, taken back if stopped."""
    start = time.perf_counter()
    try:
        S3Location.parse(url)  # a malformed URL before reading gigabytes
        size = part_bytes()
        manifest = check_source(directory)
        root = Path(directory)
        with failing_as("cannot read", root / MANIFEST_NAME, SOURCE_TODO):
            manifest_bytes = read_regular(root / MANIFEST_NAME)
        store, found = check_destination(url, manifest, parallel)
    except Stopped as stop:
        stop.outcome = f"nothing uploaded to {url}"
        raise
    run = Transfer(store, root, manifest.state_id, parallel, size)
    names = [n for n in sorted(manifest.files) if n not in found.kept]
    names += [n for n in manifest.side_files if n not in manifest.files]
    try:
        if not found.resuming:
            marker = json.dumps({"format": MARKER_FORMAT, "state_id": manifest.state_id}).encode()
            run.put_object(MARKER_NAME, marker, {STATE_KEY: manifest.state_id}, if_absent=True)
        for name, upload_id in found.stale:
            store.abort_multipart(name, upload_id)
        run.send(names, {n: r["crc32"] for n, r in manifest.files.items()})
        run.put_object(MANIFEST_NAME, manifest_bytes, {STATE_KEY: manifest.state_id})
    except ShardstateError as exc:
        run.abort_open()
        if not run.put and not found.resuming:
            raise
        todo = "; ".join(filter(None, [exc.todo, "then run the same upload again: it keeps what is already up"]))
        raise ShardstateError(exc.what, exc.where, todo) from None
    except BaseException as exc:  # a stop (or a bug): this run's objects go
        outcome = run.take_back(found)
        if isinstance(exc, Stopped):
            exc.outcome = outcome
        raise
    try:
        store.delete(MARKER_NAME)
    except Stopped as stop:  # the state is up; a marker left beside it is removed by the next upload of it
        stop.outcome = f"the upload had finished: {store.location.url()} holds the state"
        raise
    return UploadReport(store.location.url(), [*names, MANIFEST_NAME], found.kept, run.sent + len(manifest_bytes),
                        time.perf_counter() - start)
