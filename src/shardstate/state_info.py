"""`inspect` (what a sharded state holds) and `verify` (does every file still match its manifest)."""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.manifest import FORMAT_NAME, FORMAT_VERSION
from shardstate.format.safetensors_header import DTYPE_NAMES, read_header
from shardstate.format.sharded_state import check_inside, open_sharded_state
from shardstate.io.files import open_regular

CHUNK = 16 << 20


def inspect_state(root: Path) -> dict:
    manifest = open_sharded_state(root).manifest
    ranks = []
    for rank in range(manifest.tp_size):
        names = manifest.rank_files(rank)
        ranks.append({
            "rank": rank,
            "files": [{"name": n, "size": manifest.files[n]["size"]} for n in names],
            "tensors": len(manifest.tensors.get(str(rank), {})),
            "bytes": sum(manifest.files[n]["size"] for n in names),
        })
    return {
        "format": f"{FORMAT_NAME} v{FORMAT_VERSION}",
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


def _check_file(root: Path, name: str, record: dict, listed: dict[str, dict]) -> str | None:
    """The first thing wrong with one file, or None."""
    path = root / name
    if not path.exists():
        return "missing"
    try:
        check_inside(path, root)
    except ShardstateError as exc:
        return exc.what
    size = path.stat().st_size
    if size != record["size"]:
        return f"size {size}, manifest says {record['size']}"
    try:
        header = read_header(path)
    except ShardstateError as exc:
        return exc.what
    expected = {t: r for t, r in listed.items() if r["file"] == name}
    if set(header.tensors) != set(expected):
        extra, lacking = sorted(set(header.tensors) - set(expected)), sorted(set(expected) - set(header.tensors))
        return f"tensors differ from the manifest (extra {extra[:3]}, missing {lacking[:3]})"
    for tensor, entry in header.tensors.items():
        if (DTYPE_NAMES[entry.dtype], list(entry.shape)) != (expected[tensor]["dtype"], expected[tensor]["shape"]):
            return f"tensor '{tensor}' is {DTYPE_NAMES[entry.dtype]}{list(entry.shape)}, manifest says " \
                   f"{expected[tensor]['dtype']}{expected[tensor]['shape']}"
    crc = 0
    with os.fdopen(open_regular(path), "rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    if crc != record["crc32"]:
        return f"checksum {crc:08x}, manifest says {record['crc32']:08x}: the file's bytes changed"
    return None


def verify_state(root: Path) -> list[FileCheck]:
    """Check every file of the manifest (size, header, tensors, checksum); report each, not just the first."""
    manifest = open_sharded_state(root).manifest
    checks = []
    for name, record in sorted(manifest.files.items()):
        problem = _check_file(root, name, record, manifest.tensors.get(str(record["rank"]), {}))
        checks.append(FileCheck(name, problem is None, problem))
    return checks
