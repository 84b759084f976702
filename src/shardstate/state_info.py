"""`inspect` (what a sharded state holds) and `verify` (does every file still match its manifest)."""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.manifest import FORMAT_NAME, Manifest
from shardstate.format.safetensors_header import read_header
from shardstate.format.sharded_state import check_inside, check_rank_file, check_specs, open_sharded_state
from shardstate.io.digests import Expected, StreamingDigests
from shardstate.io.files import open_regular
from shardstate.models import open_model
from shardstate.store.model_dir import open_model_dir

CHUNK = 16 << 20


def inspect_state(root: Path) -> dict:
    manifest = open_sharded_state(root).manifest
    ranks = []
    for rank in range(manifest.tp_size):
        names = manifest.rank_files(rank)
        ranks.append({
            "rank": rank,
            "files": [{"name": n, "size": manifest.files[n]["size"]} for n in names],
            "tensors": len(manifest.tensors[str(rank)]),
            "bytes": sum(manifest.files[n]["size"] for n in names),
        })
    return {
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


def _check_file(root: Path, name: str, manifest: Manifest) -> str | None:
    """The first thing wrong with one file, or None."""
    path = root / name
    if not path.exists():
        return "missing"
    try:
        check_inside(path, root)
        header = read_header(path)
        check_rank_file(manifest, path, header)
    except ShardstateError as exc:
        return exc.what
    records = manifest.tensors[str(manifest.files[name]["rank"])]
    digests = StreamingDigests({path: [Expected(t, e.begin, e.end, records[t]["xxh3_64"])
                                       for t, e in header.tensors.items()]})
    crc, offset = 0, 0
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            while block := f.read(CHUNK):
                crc = zlib.crc32(block, crc)
                digests.feed(path, offset, memoryview(block))  # each tensor's xxh3-64, as a --verify load does
                offset += len(block)
    except ShardstateError as exc:
        return exc.what
    digests.finish()
    if crc != manifest.files[name]["crc32"]:
        return f"checksum {crc:08x}, manifest says {manifest.files[name]['crc32']:08x}: the file's bytes changed"
    return None


def verify_state(root: Path) -> list[FileCheck]:
    """Refuse what load would refuse in the manifest (schema, config.json, the model's layout at the saved
    TP size), then check every file (its own record, size, header, tensors, checksum) and report each,
    not just the first."""
    state = open_sharded_state(root)
    model = open_model(open_model_dir(root))
    check_specs(state.manifest, model.specs(state.tp_size), state.manifest_path)
    return [FileCheck(name, (problem := _check_file(root, name, state.manifest)) is None, problem)
            for name in sorted(state.manifest.files)]
