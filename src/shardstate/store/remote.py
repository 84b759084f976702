"""A sharded state in object storage (`s3://bucket/prefix`), loaded through a per-node cache directory.

The driver (or, under torchrun, each process) fetches the small files first: the manifest, config.json and
the other side files, into `<cache>/<bucket>-<hash of endpoint and location>/`. The cache directory is then
an ordinary sharded-state directory whose rank files arrive later: each rank fetches only its own
(`fetch_rank_files`), with parallel ranged GETs, into a temporary file that is checked against the
manifest (size and crc32) and then renamed into place. A later load reuses a cached file only after the
same check; one that fails it is fetched again. Ranks of one node share the cache: every file lands
whole, under its final name, by rename."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from shardstate.format.strict_json import loads_strict
from shardstate.io.files import open_regular
from shardstate.io.s3 import CACHE_TODO, DEFAULT_RANGES, S3Location, S3Store
from shardstate.processes import alive

CACHE_ENV = "SHARDSTATE_CACHE_DIR"
CHUNK = 16 << 20
# Temporaries are named `.NAME.fetch-HOST-PID-RANDOM`: a cache may be shared by hosts (NFS), and only this
# host can tell whether one of its processes is gone.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMPORARY = re.compile(r"\.(?P<name>.+)\.fetch-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")


RANGES_ENV = "SHARDSTATE_S3_RANGES"
MAX_RANGES = 64


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shardstate" / "remote")


def ranges_in_flight() -> int:
    """Ranged GETs in flight per file: $SHARDSTATE_S3_RANGES (1..64), default 8."""
    text = os.environ.get(RANGES_ENV)
    if text is None:
        return DEFAULT_RANGES
    if not text.isdigit() or not 1 <= int(text) <= MAX_RANGES:
        raise ShardstateError(f"{RANGES_ENV}={text!r} is not an integer from 1 to {MAX_RANGES}", None,
                              f"set it to 8-16, or unset it (default {DEFAULT_RANGES})")
    return int(text)


@dataclass(frozen=True)
class RemoteOrigin:
    """Where a cached state comes from (pickled to the workers, which fetch their own rank files)."""

    url: str
    cache: Path  # the state's directory in the node's cache
    ranges: int = DEFAULT_RANGES  # parallel ranged GETs per file

    @property
    def location(self) -> S3Location:
        return S3Location.parse(self.url)


@dataclass
class FetchReport:
    bytes_fetched: int = 0
    seconds: float = 0.0
    fetched: list[str] = field(default_factory=list)  # file names downloaded
    cached: list[str] = field(default_factory=list)  # file names the cache already held, checked


def cache_directory(location: S3Location, cache_root: Path) -> Path:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    digest = hashlib.sha256(f"{endpoint}\n{location.url()}".encode()).hexdigest()[:16]
    return cache_root / f"{location.bucket}-{digest}"


def fetch_metadata(url: str, cache_root: Path | None = None, ranges: int | None = None) -> RemoteOrigin:
    """The manifest, config.json and side files of the state at `url` into this node's cache (each
    replaced whole). The manifest is read before the others and written last, so the cache directory
    holds a manifest only with the side files it names."""
    location = S3Location.parse(url)
    store = S3Store(location)
    directory = cache_directory(location, (cache_root or default_cache_root()).absolute())
    with failing_as("cannot create the cache directory", directory, CACHE_TODO):
        directory.mkdir(parents=True, exist_ok=True)
    manifest_bytes = _read_manifest_bytes(store, location)
    try:
        doc = loads_strict(manifest_bytes)
    except ValueError as exc:
        raise ShardstateError(f"{location.url(MANIFEST_NAME)} is not a valid manifest ({exc})", None,
                              "upload the state again") from None
    manifest = parse_manifest(doc, directory / MANIFEST_NAME)
    for name in manifest.side_files:
        _replace(directory, name, store.read_bytes(name))
    _replace(directory, MANIFEST_NAME, manifest_bytes)
    return RemoteOrigin(location.url(), directory, ranges or ranges_in_flight())


def _read_manifest_bytes(store: S3Store, location: S3Location) -> bytes:
    try:
        size = store.size(MANIFEST_NAME)
    except ShardstateError as exc:
        if "does not exist" not in exc.what:
            raise
        raise ShardstateError(f"{location.url(MANIFEST_NAME)} does not exist", None,
                              "an s3:// model must be a sharded state uploaded with `shardstate upload`") from None
    if size > MAX_MANIFEST_BYTES:
        raise ShardstateError(f"{location.url(MANIFEST_NAME)} is {size} bytes, over the manifest limit", None,
                              "this is not a shardstate manifest")
    return store.read_bytes(MANIFEST_NAME)


def fetch_rank_files(origin: RemoteOrigin, manifest: Manifest, rank: int) -> FetchReport:
    """Rank `rank`'s files into the cache: each one already there and matching the manifest is kept,
    any other fetched and checked before it takes its name."""
    start = time.perf_counter()
    report = FetchReport()
    store: S3Store | None = None
    for name in manifest.rank_files(rank):
        record = manifest.files[name]
        path = origin.cache / name
        _remove_dead_temporaries(origin.cache, name)
        if file_matches(path, record["size"], record["crc32"]):
            report.cached.append(name)
            continue
        store = store or S3Store(origin.location)
        size = store.size(name)
        if size != record["size"]:
            raise ShardstateError(f"{origin.location.url(name)} is {size} bytes, the manifest says {record['size']}",
                                  None, "the object is truncated or was replaced: upload the state again")
        temporary = origin.cache / temporary_name(name)
        try:
            if store.fetch(name, size, temporary, origin.ranges) != record["crc32"]:
                raise ShardstateError(f"{origin.location.url(name)} does not match its checksum in the manifest",
                                      None, "the object changed since it was uploaded: upload again, from a "
                                      "directory that passes `shardstate verify`")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        report.fetched.append(name)
        report.bytes_fetched += size
    report.seconds = time.perf_counter() - start
    return report


def file_matches(path: Path, size: int, crc32: int) -> bool:
    """Whether `path` is a regular file of `size` bytes with this crc32."""
    try:
        fd = open_regular(path)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            return False
        crc = 0
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return crc == crc32


def temporary_name(name: str) -> str:
    return f".{name}.fetch-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _replace(directory: Path, name: str, data: bytes) -> None:
    """`directory/name` becomes `data`, whole, by rename."""
    temporary = directory / temporary_name(name)
    try:
        with failing_as("cannot write", temporary, CACHE_TODO):
            with open(temporary, "xb") as f:
                f.write(data)
            os.replace(temporary, directory / name)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_dead_temporaries(directory: Path, name: str) -> None:
    """Temporaries of `name` left by a fetch on this node whose process is gone (killed mid-download)."""
    for path in directory.glob(f".{name}.fetch-{HOST}-*"):
        match = TEMPORARY.fullmatch(path.name)
        if match and not alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def remove_temporaries_of(directory: Path, pid: int) -> None:
    """Every temporary a fetching process of this host (`pid`, now dead) left in the cache directory."""
    for path in directory.glob(f".*.fetch-{HOST}-{pid}-*"):
        if TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)
