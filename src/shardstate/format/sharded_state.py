"""A sharded-state directory as a reader sees it: the manifest, checked against config.json, and each
rank's files indexed and checked against the manifest and the tensors the reader needs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import TensorLocation
from shardstate.format.manifest import MANIFEST_NAME, Manifest, read_manifest
from shardstate.format.safetensors_header import DTYPE_NAMES, read_header
from shardstate.io.reader import ReadAccount


@dataclass(frozen=True)
class ShardedState:
    root: Path
    manifest: Manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME


def open_sharded_state(root: Path) -> ShardedState:
    """Read the manifest and refuse it if config.json is not the one the files were made for."""
    manifest = read_manifest(root)
    if hashlib.sha256((root / "config.json").read_bytes()).hexdigest() != manifest.config_sha256:
        raise ShardstateError(
            "config.json differs from the one the files were made for", root / MANIFEST_NAME,
            "restore config.json or convert again",
        )
    return ShardedState(root, manifest)


def index_rank(
    state: ShardedState,
    rank: int,
    needs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    account: ReadAccount,
) -> dict[str, TensorLocation]:
    """Where each needed tensor of `rank` lies. Every file of the rank must exist; every tensor in it
    must be listed for that file in the manifest and appear once; needed tensors must have exactly the
    shape and dtype asked for; the only others allowed are the manifest's constants (vLLM's scales)."""
    listed = state.manifest.tensors.get(str(rank), {})
    found: dict[str, TensorLocation] = {}
    for name in state.manifest.rank_files(rank):
        path = state.root / name
        if not path.is_file():
            raise ShardstateError(f"rank {rank} file {name} is missing", state.root, "convert again")
        header = read_header(path)
        account.note_header(path, header.data_start)
        for tensor, entry in header.tensors.items():
            record = listed.get(tensor)
            if record is None or record["file"] != name or tensor in found:
                raise ShardstateError(f"unexpected tensor '{tensor}'", path, "the file does not match the manifest")
            found[tensor] = TensorLocation(path, entry)
            if tensor not in needs:
                if record["spec"].get("kind") != "constant":
                    raise ShardstateError(f"unexpected tensor '{tensor}'", path, "the file does not match the model")
                continue
            shape, dtype = needs[tensor]
            if entry.shape != shape or entry.dtype != dtype:
                raise ShardstateError(
                    f"tensor '{tensor}' is {DTYPE_NAMES[entry.dtype]}{list(entry.shape)}, the model needs "
                    f"{DTYPE_NAMES[dtype]}{list(shape)}", path, "convert again for this model",
                )
    missing = sorted(set(needs) - set(found))
    if missing:
        raise ShardstateError(
            f"rank {rank} lacks tensor '{missing[0]}' ({len(missing)} missing)", state.root, "convert again"
        )
    return {name: found[name] for name in needs}
