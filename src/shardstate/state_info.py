"""`inspect` (what a sharded state holds) and `verify` (does every file still match its manifest)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.manifest import FORMAT_NAME, Manifest
from shardstate.format.safetensors_header import SafetensorsHeader, read_header
from shardstate.format.sharded_state import (
    ShardedState,
    check_inside,
    check_rank_file,
    check_specs,
    open_sharded_state,
)
from shardstate.io.crc32 import crc32
from shardstate.io.digests import Expected, StreamingDigests
from shardstate.io.engine import CHUNK
from shardstate.io.files import open_regular
from shardstate.io.reader import ReadAccount
from shardstate.io.s3 import RemoteFiles, is_s3
from shardstate.models import open_model
from shardstate.store.model_dir import fetch_every_rank, open_model_dir
from shardstate.store.remote import rank_objects


def checked_state(root: Path) -> ShardedState:
    """The state at `root` with its manifest refused where a load would refuse it: schema, config.json's
    sha256, the model's tensors and layouts at the saved TP size. `inspect` and `verify` both start here,
    so neither prints what a load refuses."""
    state = open_sharded_state(root)
    model = open_model(open_model_dir(root))
    check_specs(state.manifest, model.state_specs(), state.manifest_path)
    return state


def inspect_location(location: str | Path, cache_dir: str | os.PathLike[str] | None = None) -> dict:
    """`inspect_state` of a local directory, or of an s3:// state: its manifest and side files fetched
    into the node cache, the rank files' headers read in place (ranged GETs), nothing else fetched."""
    if not is_s3(location):
        return inspect_state(Path(location))
    directory = open_model_dir(location, cache_dir)
    manifest = directory.state.manifest if directory.state is not None else None
    remote = rank_objects(directory.remote, manifest) if manifest is not None else None
    with directory.errors_named():
        return inspect_state(directory.path, remote)


def inspect_state(root: Path, remote: RemoteFiles | None = None) -> dict:
    """What the state holds, each rank file's own record and header checked (`problem`; `ok` false if any
    has one): what a load refuses before reading a weight, inspect flags. Data is not read (`verify`).
    With `remote`, the rank files are the objects it holds."""
    manifest = checked_state(root).manifest
    ranks = []
    with ReadAccount(remote) as account:
        for rank in range(manifest.world_size):
            names = manifest.rank_files(rank)
            files = [{"name": n, "size": manifest.files[n]["size"],
                      "problem": _record_problem(root, n, manifest, account)[0]} for n in names]
            stage = {"pp": rank // manifest.tp_size, "tp": rank % manifest.tp_size} if manifest.pp_size > 1 else {}
            ranks.append({
                "rank": rank,
                **stage,
                "files": files,
                "tensors": len(manifest.tensors[str(rank)]),
                "bytes": sum(manifest.files[n]["size"] for n in names),
            })
    return {
        "ok": not any(f["problem"] for r in ranks for f in r["files"]),
        "format": f"{FORMAT_NAME} v{manifest.version}",
        "tp_size": manifest.tp_size,
        "pp_size": manifest.pp_size,
        "architecture": manifest.architecture,
        "dtype": manifest.dtype,
        "quantization": manifest.quantization,
        "pattern": manifest.pattern,
        "source": manifest.source,
        "ranks": ranks,
        "total_bytes": sum(r["bytes"] for r in ranks),
    }


@dataclass(frozen=True)
class FileCheck:
    name: str
    ok: bool
    problem: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _record_problem(
    root: Path, name: str, manifest: Manifest, account: ReadAccount | None = None
) -> tuple[str | None, SafetensorsHeader | None]:
    """What is wrong with one file's place, header and own record (state, rank, part, tensors), or its
    header when nothing is. Through `account`: an object where it says so."""
    path = root / name
    remote = account is not None and account.remote is not None and account.remote.holds(path)
    if not remote and not path.exists():
        return "missing", None
    try:
        if not remote:
            check_inside(path, root)
        reader = account.reader(path) if account is not None else None
        header = read_header(path, reader)
        check_rank_file(manifest, path, header, reader.size if reader is not None else None)
    except ShardstateError as exc:
        return exc.what, None
    return None, header


def check_file(root: Path, name: str, manifest: Manifest) -> str | None:
    """The first thing wrong with one file, or None."""
    problem, header = _record_problem(root, name, manifest)
    if header is None:
        return problem
    path = root / name
    records = manifest.tensors[str(manifest.files[name]["rank"])]
    digests = StreamingDigests({path: [Expected(t, e.begin, e.end, records[t]["xxh3_64"])
                                       for t, e in header.tensors.items()]})
    crc, offset = 0, 0
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            while block := f.read(CHUNK):
                crc = crc32(block, crc)
                digests.feed(path, offset, memoryview(block))  # each tensor's xxh3-64, as a --verify load does
                offset += len(block)
    except ShardstateError as exc:
        return exc.what
    digests.finish()
    if crc != manifest.files[name]["crc32"]:
        return f"checksum {crc:08x}, manifest says {manifest.files[name]['crc32']:08x}: the file's bytes changed"
    return None


def verify_location(location: str | Path, cache_dir: str | os.PathLike[str] | None = None) -> list[FileCheck]:
    """`verify_state` of a local directory, or of an s3:// state with every rank's files fetched into the
    node cache (each checked on the way) and then verified there."""
    if not is_s3(location):
        return verify_state(Path(location))
    directory = open_model_dir(location, cache_dir)
    fetch_every_rank(directory)
    with directory.errors_named():
        return verify_state(directory.path)


def verify_state(root: Path) -> list[FileCheck]:
    """Refuse what load would refuse in the manifest (schema, config.json, the model's layout at the saved
    TP size), then check every file (its own record, size, header, tensors, checksum) and report each,
    not just the first."""
    state = checked_state(root)
    return [FileCheck(name, (problem := check_file(root, name, state.manifest)) is None, problem)
            for name in sorted(state.manifest.files)]
