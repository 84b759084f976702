"""What a cache entry is keyed on: everything that changes a rank's bytes, cheap enough never to read a
weight. The checkpoint is known by its files' names and sizes, plus either the content hash a Hugging Face
cache names its blobs by, or the modification time and the safetensors header; config.json and the
index by their sha256. The rest (architecture, dtype, quantization, parallel sizes, versions, role) comes
from vLLM's configuration, gathered by the loader (vllm/loader.py) into plain values."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.checkpoint import INDEX_NAME, PICKLE_SUFFIXES
from shardstate.io.files import read_regular

FIELDS_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
DIGESTED = ("config.json", INDEX_NAME)
BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git (small files) or sha256 (LFS) names of HF cache blobs
MAX_SMALL_FILE = 64 << 20
MAX_HEADER = 100 << 20


def checkpoint_identity(model_dir: Path) -> list[dict]:
    """One record per weight file (name, size, then `blob` or `mtime_ns` + `header_sha256`) and per
    digested file (name, sha256), by name."""
    records = []
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name in DIGESTED:
            with failing_as("cannot read", path, "check the file"):
                data = read_regular(path, MAX_SMALL_FILE)
            records.append({"name": path.name, "sha256": hashlib.sha256(data).hexdigest()})
        elif path.name.endswith(WEIGHT_SUFFIXES):
            records.append({"name": path.name, **_weight_identity(path)})
    if not any(r["name"].endswith(WEIGHT_SUFFIXES) for r in records):
        raise ShardstateError("holds no weight files", model_dir, "point --model at the checkpoint's directory")
    return records


def _weight_identity(path: Path) -> dict:
    """A file in a Hugging Face cache is a link to `blobs/HASH`: its content hash. Anything else: size,
    modification time and, for safetensors, its header (layout and metadata), read without the data."""
    target = path.resolve()
    stat = target.stat()
    if path.is_symlink() and target.parent.name == "blobs" and BLOB.fullmatch(target.name):
        return {"size": stat.st_size, "blob": target.name}
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.name.endswith(".safetensors"):
        identity["header_sha256"] = _header_digest(path)
    return identity


def _header_digest(path: Path) -> str:
    with failing_as("cannot read", path, "check the file"), open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER:
            raise ShardstateError(f"safetensors header of {length} bytes", path, "check the file")
        return hashlib.sha256(f.read(length)).hexdigest()


def key_fields(
    model_dir: Path, *, architecture: str, dtype: str, quantization: str | None, tp_size: int, pp_size: int,
    vllm_version: str, role: str, format_version: int, overrides: dict,
) -> dict:
    """The entry's key, as plain JSON values (written readably in the entry's key.json)."""
    return {
        "fields_version": FIELDS_VERSION,
        "checkpoint": {"path": os.fspath(model_dir), "files": checkpoint_identity(model_dir)},
        "architecture": architecture,
        "dtype": dtype,
        "quantization": quantization,
        "tp_size": tp_size,
        "pp_size": pp_size,
        "vllm": vllm_version,
        "shardstate_format": format_version,
        "role": role,
        "overrides": overrides,
    }
