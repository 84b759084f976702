"""`shardstate upload DIR s3://bucket/prefix`: a complete sharded state into object storage, published so
that a reader never sees half of it: the rank files first (multipart, several at a time), then the side
files, the manifest last. The prefix must be empty: shardstate never overwrites what it did not write."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.manifest import MANIFEST_NAME
from shardstate.format.sharded_state import open_sharded_state
from shardstate.io.s3 import DEFAULT_RANGES, S3Location, S3Store
from shardstate.store.remote import file_matches

PARALLEL_FILES = 4


def empty_prefix(url: str) -> S3Store:
    """The store of `url`, refused unless nothing is there yet."""
    store = S3Store(S3Location.parse(url))
    existing = list(store.objects())
    if existing and MANIFEST_NAME not in existing:  # e.g. an upload stopped half-way
        raise ShardstateError(f"{store.location.url()} already holds {len(existing)} object(s) (e.g. {existing[0]}) "
                              "and no manifest: an upload that did not finish, or someone else's objects", None,
                              "delete them if they are a stopped upload's, or upload to a new prefix")
    if existing:
        raise ShardstateError(f"{store.location.url()} already holds {len(existing)} object(s) (e.g. {existing[0]})",
                              None, "upload to a new prefix; shardstate never overwrites what it did not write")
    return store


@dataclass(frozen=True)
class UploadReport:
    url: str
    files: list[str]
    bytes_uploaded: int
    seconds: float


def upload_state(directory: str | Path, url: str, parallel: int = DEFAULT_RANGES) -> UploadReport:
    """Every rank file checked against the manifest (size, crc32) first: a damaged state is refused before
    anything is uploaded, rather than refused by every node that fetches it."""
    start = time.perf_counter()
    root = Path(directory)
    state = open_sharded_state(root)  # manifest and config.json checked; no manifest: refused
    manifest = state.manifest
    assert manifest is not None
    for name, record in sorted(manifest.files.items()):
        path = root / name
        size = path.stat().st_size if path.is_file() else None
        if size != record["size"]:
            found = "missing" if size is None else f"{size} bytes, the manifest says {record['size']}"
            raise ShardstateError(f"{name} is {found}", root, "run `shardstate verify` and re-create the state")
        if not file_matches(path, record["size"], record["crc32"]):  # before anything is published
            raise ShardstateError(f"{name} does not match its checksum in the manifest", root,
                                  "run `shardstate verify` and re-create the state; nothing was uploaded")
    store = empty_prefix(url)
    location = store.location
    rank_files = sorted(manifest.files)
    with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:
        for future in [pool.submit(store.upload, root / name, name, parallel) for name in rank_files]:
            future.result()
    for name in manifest.side_files:
        store.upload(root / name, name, parallel)
    store.upload(root / MANIFEST_NAME, MANIFEST_NAME, parallel)
    files = [*rank_files, *manifest.side_files, MANIFEST_NAME]
    uploaded = sum((root / name).stat().st_size for name in files)
    return UploadReport(location.url(), files, uploaded, time.perf_counter() - start)
