"""shardstate.json: what a sharded-state directory holds, written last so that its presence means the
directory is complete."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.io.files import read_regular

MANIFEST_NAME = "shardstate.json"
FORMAT_NAME = "shardstate"
FORMAT_VERSION = 1
PP1_PATTERN = "model-rank-{rank}-part-{part}.safetensors"  # vLLM's, so vLLM can load the files
CHECKSUM = "crc32"


@dataclass
class Manifest:
    tp_size: int
    architecture: str
    config_sha256: str
    dtype: str
    source: list[dict]  # [{"name", "size"}] of the checkpoint converted from
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"rank", "part", "size", "crc32"}
    tensors: dict[str, dict[str, dict]] = field(default_factory=dict)  # rank -> name -> entry
    pp_size: int = 1
    pattern: str = PP1_PATTERN
    quantization: str | None = None

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "checksum": CHECKSUM, **self.__dict__}

    def rank_files(self, rank: int) -> list[str]:
        return sorted((n for n, f in self.files.items() if f["rank"] == rank), key=lambda n: self.files[n]["part"])


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write atomically (temp file, fsync, rename) so that a reader never sees half a manifest."""
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        doc = json.loads(read_regular(path))
    except FileNotFoundError:
        raise ShardstateError(
            "no shardstate.json (the directory is incomplete or not a sharded state)", directory,
            "re-run `shardstate convert`",
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardstateError(f"unreadable manifest ({exc})", path, "re-run `shardstate convert`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ShardstateError("not a shardstate manifest", path, "re-run `shardstate convert`")
    if doc.get("version") != FORMAT_VERSION:
        raise ShardstateError(
            f"manifest version {doc.get('version')!r}, this shardstate reads version {FORMAT_VERSION}", path,
            "convert again with this shardstate, or upgrade it",
        )
    try:
        fields = {k: doc[k] for k in ("tp_size", "architecture", "config_sha256", "dtype", "source", "files",
                                      "tensors", "pp_size", "pattern", "quantization")}
        manifest = Manifest(**fields)
    except (KeyError, TypeError) as exc:
        raise ShardstateError(f"manifest lacks {exc}", path, "re-run `shardstate convert`") from None
    for name in manifest.files:
        if Path(name).name != name or name.startswith("."):
            raise ShardstateError(f"manifest names file {name!r} outside the directory", path, "refusing it")
    return manifest
