"""A model in object storage (`s3://bucket/prefix`), loaded through a per-node cache directory.

The driver (or, under torchrun, each process) fetches the small files first into
`<cache>/<bucket>-<hash of endpoint and location>/`: a sharded state's manifest, config.json and side
files; a Hugging Face checkpoint's config, index and tokenizer files (its weight objects are then read in
place by the loaders, through io/storage.py). The cache directory is then an ordinary directory whose rank
files arrive as each rank loads (`load_rank_files`): a file the cache holds is read whole into load
memory with its crc32 taken on the way; one it lacks (or holds damaged) is fetched through the same
engine, with parallel ranged GETs straight into load memory, and checked against the manifest. The load
then goes on while a thread writes the fetched files into the cache (store/cache_files.py). Ranks of one
node share the cache: every file lands whole, under its final name, by rename. `fetch_rank_files`
fetches to the cache only (verify, a reshard), through the engine too, a bounded piece at a time."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.checkpoint import PICKLE_SUFFIXES
from shardstate.format.config_json import CONFIG_NAME
from shardstate.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, is_plain_name, parse_manifest
from shardstate.format.sharded_state import LEGACY_FILE
from shardstate.format.strict_json import loads_strict
from shardstate.io.arena import Scratch
from shardstate.io.crc32 import Crc32Sink
from shardstate.io.engine import Span, read_spans
from shardstate.io.reader import ReadAccount
from shardstate.io.s3 import (
    CACHE_TODO,
    DEFAULT_RANGES,
    SMALL_OBJECT_LIMIT,
    ObjectInfo,
    RemoteFiles,
    S3Location,
    S3Store,
    store_for,
)
from shardstate.io.storage import FetchReport
from shardstate.processes import tag_alive
from shardstate.store.cache_files import (
    HOST,
    TEMPORARY,
    CacheFile,
    open_cache_files,
    write_in_background,
)

CACHE_ENV = "SHARDSTATE_CACHE_DIR"
CACHE_MARKER = ".shardstate-cache"
PIECE = 256 << 20  # fetch_rank_files holds at most this much of a file in memory at once


RANGES_ENV = "SHARDSTATE_S3_RANGES"
MAX_RANGES = 64


def node_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The node cache's root, absolute and created: `cache_dir`, else $SHARDSTATE_CACHE_DIR, else
    ~/.cache/shardstate/remote. Refused in one line before anything is written: an empty name (it would
    cache in the working directory), a file, a dangling symlink, a path under a file. Dead runs'
    temporaries in it are removed on the way."""
    given, named = (cache_dir, "--cache-dir") if cache_dir is not None else (os.environ.get(CACHE_ENV), CACHE_ENV)
    if given is None:
        given = Path.home() / ".cache" / "shardstate" / "remote"
    todo = f"set {named} to a directory (shardstate makes it if it is missing)"
    if os.fspath(given) == "":
        raise ShardstateError(f"{named} is empty", None, todo)
    root = Path(given).absolute()
    for path in (root, *root.parents):
        if path.is_symlink() and not path.exists():
            raise ShardstateError(f"{named} leads through a dangling symlink", path, todo)
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == root else f"is under a file ({path})"
                raise ShardstateError(f"{named} {what}, not a directory", root, todo)
            break
    with failing_as(f"cannot create the cache directory ({named})", root, todo):
        root.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(root)
    return root


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
    cache: Path  # the model's directory in the node's cache
    ranges: int = DEFAULT_RANGES  # parallel ranged GETs per file
    weights: dict[str, ObjectInfo] = field(default_factory=dict)  # a HF checkpoint: its weight objects

    @property
    def location(self) -> S3Location:
        return S3Location.parse(self.url)

    def remote_weights(self) -> RemoteFiles | None:
        """A HF checkpoint's weight files as the loaders read them: objects, in place."""
        return RemoteFiles(self.cache, self.url, self.weights, self.ranges) if self.weights else None


def cache_directory(location: S3Location, cache_root: Path) -> Path:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    digest = hashlib.sha256(f"{endpoint}\n{location.url()}".encode()).hexdigest()[:16]
    return cache_root / f"{location.bucket}-{digest}"


def fetch_metadata(
    url: str, cache_dir: str | os.PathLike[str] | None = None, ranges: int | None = None
) -> RemoteOrigin:
    """The small files of the model at `url` into this node's cache (each replaced whole). A sharded state
    (a manifest at `url`): the manifest is read before its side files and written last, so the cache
    directory holds a manifest only with the side files it names. A Hugging Face checkpoint (config.json
    and *.safetensors, no manifest): config, index and tokenizer files; its weight files stay objects,
    read in place by the loaders (`RemoteOrigin.weights`)."""
    location = S3Location.parse(url)
    store = store_for(location)
    directory = cache_directory(location, node_cache_root(cache_dir))
    with failing_as("cannot create the cache directory", directory, CACHE_TODO):
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.iterdir()):
            (directory / CACHE_MARKER).touch()
    if not (directory / CACHE_MARKER).is_file():  # its files are replaced and removed: only in shardstate's own
        raise ShardstateError("not a directory shardstate made for its cache (no .shardstate-cache)", directory,
                              "choose another --cache-dir")
    objects = store.objects()
    if MANIFEST_NAME not in objects:
        return _fetch_checkpoint_files(store, directory, objects, ranges or ranges_in_flight())
    if objects[MANIFEST_NAME].size > MAX_MANIFEST_BYTES:
        raise ShardstateError(f"{location.url(MANIFEST_NAME)} is {objects[MANIFEST_NAME].size} bytes, over the "
                              "manifest limit", None, "this is not a shardstate manifest")
    manifest_bytes = store.read_bytes(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    try:
        doc = loads_strict(manifest_bytes)
    except ValueError as exc:
        raise ShardstateError(f"{location.url(MANIFEST_NAME)} is not a valid manifest ({exc})", None,
                              "upload the state again") from None
    manifest = parse_manifest(doc, directory / MANIFEST_NAME)
    _remove_others(directory, manifest.names_written())  # e.g. a tokenizer file of what this location held before
    for name in manifest.side_files:
        _replace(directory, name, store.read_bytes(name))  # bounded: side files are config and tokenizer files
    _replace(directory, MANIFEST_NAME, manifest_bytes)
    return RemoteOrigin(location.url(), directory, ranges or ranges_in_flight())


def _fetch_checkpoint_files(
    store: S3Store, directory: Path, objects: dict[str, ObjectInfo], ranges: int
) -> RemoteOrigin:
    """A Hugging Face checkpoint's small files into the cache; its weight objects listed by name and size."""
    location = store.location
    top = {name: info for name, info in objects.items() if is_plain_name(name)}
    weights = {name: info for name, info in top.items() if name.endswith(".safetensors")}
    if CONFIG_NAME not in top or not weights:
        lacking = "config.json" if CONFIG_NAME not in top else "*.safetensors weight files"
        raise ShardstateError(f"{location.url()} holds no shardstate.json and no {lacking}", None,
                              "an s3:// model is a sharded state (`shardstate upload`) or a Hugging Face checkpoint "
                              "(config.json and *.safetensors)")
    if any(LEGACY_FILE.fullmatch(name) for name in weights):
        raise ShardstateError(f"{location.url()} holds rank files but no shardstate.json", None,
                              "an upload that did not finish, or a vLLM-written state (whose files cannot be "
                              "checked): upload a directory that passes `shardstate verify`")
    small = {name for name, info in top.items()
             if name not in weights and not name.endswith(PICKLE_SUFFIXES) and info.size <= SMALL_OBJECT_LIMIT}
    _remove_others(directory, small)  # e.g. a manifest or an index of what this location held before
    for name in sorted(small):
        _replace(directory, name, store.read_bytes(name))
    return RemoteOrigin(location.url(), directory, ranges, weights)


def fetch_rank_files(origin: RemoteOrigin, manifest: Manifest, rank: int) -> FetchReport:
    """Rank `rank`'s files into the cache (for what reads every rank here: verify, a reshard): each one
    already there and matching the manifest is kept; any other goes through the engine PIECE bytes at a
    time (ranged GETs into one reused arena, crc32 per range) into a temporary, renamed into place once its
    crc32 matches the manifest."""
    start = time.perf_counter()
    report, scratch, missing = FetchReport(), Scratch(), {}
    with ReadAccount() as account:
        for name in manifest.rank_files(rank):
            size, crcs = manifest.files[name]["size"], Crc32Sink()
            if _size_of(origin.cache / name) == size:
                for _ in _pieces(origin.cache / name, size, account, crcs, scratch):
                    pass
                if crcs.crc(name, size) == manifest.files[name]["crc32"]:
                    report.cached.append(name)
                    continue
            missing[name] = size
        account.use_remote(RemoteFiles(origin.cache, origin.url, _versions(origin, missing), origin.ranges))
        for name, size in missing.items():
            crcs, file = Crc32Sink(), CacheFile(origin.cache, name, size)
            try:
                for at, piece in _pieces(origin.cache / name, size, account, crcs, scratch):
                    file.write(at, memoryview(piece.numpy()))
                check_crc(origin, name, crcs.crc(name, size), manifest)
                file.publish()
            finally:
                file.discard()
            report.fetched.append(name)
            report.bytes_fetched += size
    report.seconds = time.perf_counter() - start
    return report


def _pieces(path: Path, size: int, account: ReadAccount, crcs: Crc32Sink,
            scratch: Scratch) -> Iterator[tuple[int, torch.Tensor]]:
    """The file's bytes PIECE at a time (offset, bytes), read by the engine into `scratch`'s arena (valid
    until the next piece), each range's crc32 fed to `crcs`."""
    for at in range(0, size, PIECE):
        (piece,) = read_spans([Span(path, at, min(at + PIECE, size))], "read", account, sink=crcs, scratch=scratch)
        yield at, piece


def load_rank_files(
    origin: RemoteOrigin, manifest: Manifest, rank: int, account: ReadAccount, threads: int,
    scratch: Scratch | None = None,
) -> dict[Path, torch.Tensor]:
    """Every file of the rank, whole, in load memory (`scratch`'s arena when given: the rank's memory
    reserved as its worker started), each one's crc32 taken as its bytes arrive and checked against the
    manifest, all in one read of the engine: those the node cache holds from it (`threads` readers),
    those it lacks from object storage (`origin.ranges` ranged GETs in flight). A held file found damaged
    is fetched again after, into memory of its own (its first copy stays in the arena while the rank
    lives: rare, and the common case keeps one read). The fetched files' temporaries are made in the cache
    before this returns; a thread writes them from the loaded memory (which it only reads) and renames
    them into place meanwhile (store/cache_files.py: who waits for it, what a stop does). Returns each
    file's bytes by its cache path; `account.fetch_report` says what came from where."""
    start = time.perf_counter()
    report = account.fetch_report
    sizes = {name: manifest.files[name]["size"] for name in manifest.rank_files(rank)}
    held = [name for name, size in sizes.items() if _size_of(origin.cache / name) == size]
    fetch = [name for name in sizes if name not in held]
    images, crcs = _read_whole(origin, sizes, fetch, account, threads, scratch)
    for name in fetch:
        check_crc(origin, name, crcs[name], manifest)
    damaged = [name for name in held if crcs[name] != manifest.files[name]["crc32"]]
    if damaged:
        again, crcs = _read_whole(origin, {name: sizes[name] for name in damaged}, damaged, account, threads)
        for name in damaged:
            check_crc(origin, name, crcs[name], manifest)
        images.update(again)
        fetch += damaged
    if fetch:
        write_in_background(open_cache_files(origin.cache, {name: sizes[name] for name in fetch}),
                            [images[origin.cache / name] for name in fetch])
    report.cached.extend(name for name in held if name not in damaged)
    report.fetched.extend(fetch)
    report.bytes_fetched += sum(sizes[name] for name in fetch)
    report.seconds += time.perf_counter() - start
    return images


def _read_whole(origin: RemoteOrigin, sizes: dict[str, int], fetch: list[str], account: ReadAccount, threads: int,
                scratch: Scratch | None = None) -> tuple[dict[Path, torch.Tensor], dict[str, int]]:
    """The named files (name -> size) whole, in one read: `fetch` from object storage, the rest from the
    node cache; with each file's crc32."""
    if fetch:
        account.use_remote(RemoteFiles(origin.cache, origin.url, _versions(origin, {n: sizes[n] for n in fetch}),
                                       origin.ranges))
    paths, sink = [origin.cache / name for name in sizes], Crc32Sink()
    images = read_spans([Span(path, 0, sizes[path.name]) for path in paths], "read", account, threads, sink=sink,
                        scratch=scratch)
    return dict(zip(paths, images, strict=True)), {name: sink.crc(name, size) for name, size in sizes.items()}


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def rank_objects(origin: RemoteOrigin, manifest: Manifest, ranks: list[int] | None = None) -> RemoteFiles:
    """The rank files of `ranks` (default: every rank) as the objects they are (each one's size checked
    against the manifest), for what reads them in place: inspect's header reads, a reshard on load."""
    sizes = {name: record["size"] for name, record in manifest.files.items()
             if ranks is None or record["rank"] in ranks}
    return RemoteFiles(origin.cache, origin.url, _versions(origin, sizes), origin.ranges)


def _versions(origin: RemoteOrigin, sizes: dict[str, int]) -> dict[str, ObjectInfo]:
    """Each object's current version (a HEAD each), refused unless it is as large as the manifest says."""
    store = store_for(origin.location)
    versions = {}
    for name, expected in sizes.items():
        versions[name] = store.head(name)
        if versions[name].size != expected:
            raise ShardstateError(f"{origin.location.url(name)} is {versions[name].size} bytes, the manifest says "
                                  f"{expected}", None, "the object is truncated or was replaced: upload it again")
    return versions


def check_crc(origin: RemoteOrigin, name: str, crc: int, manifest: Manifest) -> None:
    if crc != manifest.files[name]["crc32"]:
        raise ShardstateError(f"{origin.location.url(name)} does not match its checksum in the manifest", None,
                              "the object changed since it was uploaded: upload again, from a directory that "
                              "passes `shardstate verify`")


def _replace(directory: Path, name: str, data: bytes) -> None:
    """`directory/name` becomes `data`, whole, by rename."""
    file = CacheFile(directory, name, len(data))
    try:
        file.write(0, memoryview(data))
        file.publish()
    finally:
        file.discard()


def _remove_others(directory: Path, keep: set[str]) -> None:
    """Every visible file of the cache directory but `keep` (what the location held before; the cache is
    shardstate's own). Temporaries are dot-files: those of live fetches are left alone."""
    for path in directory.iterdir():
        if not path.name.startswith(".") and path.name not in keep and path.is_file():
            path.unlink(missing_ok=True)


def remove_dead_temporaries(cache_root: Path) -> None:
    """Every temporary in the node cache (each location's directory under `cache_root`) left by a fetch on
    this host whose process is gone: killed mid-download, it could not remove its own. Run by whatever
    opens the node cache, so none outlives the next run."""
    for directory in cache_root.iterdir() if cache_root.is_dir() else ():
        if not (directory / CACHE_MARKER).is_file():
            continue
        for path in directory.glob(f".*.fetch-{HOST}-*"):
            match = TEMPORARY.fullmatch(path.name)
            if match and not tag_alive(match["process"]):
                path.unlink(missing_ok=True)


def remove_temporaries_of(directory: Path, pid: int) -> None:
    """Every temporary a fetching process of this host (`pid`, now dead) left in the cache directory."""
    for path in directory.glob(f".*.fetch-{HOST}-{pid}-*"):
        if TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)
