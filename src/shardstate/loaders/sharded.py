"""`sharded`: each rank opens only its own files of a sharded state and reads every tensor straight
into its parameter. Everything is checked against the manifest and the model before a weight is read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.manifest import MANIFEST_NAME, read_manifest
from shardstate.format.safetensors_header import DTYPE_NAMES, read_header
from shardstate.io.reader import ReadAccount, byte_view
from shardstate.loaders.base import LoadTarget


def load_sharded(target: LoadTarget, model_dir: Path) -> ReadAccount:
    manifest = read_manifest(model_dir)
    manifest_path = model_dir / MANIFEST_NAME
    if manifest.tp_size != target.tp_size:
        raise ShardstateError(
            f"saved for TP={manifest.tp_size}, running TP={target.tp_size}", model_dir,
            f"run `shardstate convert {model_dir} OUT --tp {target.tp_size}` from the original checkpoint",
        )
    if hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest() != manifest.config_sha256:
        raise ShardstateError(
            "config.json differs from the one the files were made for", manifest_path,
            "restore config.json or convert again",
        )
    dtype = next(iter(target.params.values())).dtype
    if manifest.dtype != DTYPE_NAMES[dtype]:
        raise ShardstateError(
            f"saved as {manifest.dtype}, running {DTYPE_NAMES[dtype]}", manifest_path,
            f"run with --dtype {manifest.dtype}, or convert with --dtype",
        )
    expected = manifest.tensors.get(str(target.rank), {})
    with ReadAccount() as account:
        reads = []
        found: set[str] = set()
        for name in manifest.rank_files(target.rank):
            path = model_dir / name
            if not path.is_file():
                raise ShardstateError(f"rank {target.rank} file {name} is missing", model_dir, "convert again")
            header = read_header(path)
            account.note_header(path, header.data_start)
            for tensor, entry in header.tensors.items():
                listed = expected.get(tensor)
                if listed is None or listed["file"] != name or tensor in found:
                    raise ShardstateError(f"unexpected tensor '{tensor}'", path, "the file does not match the manifest")
                found.add(tensor)
                param = target.params.get(tensor)
                if param is None:
                    continue  # vLLM's attention scale constants: no parameter here
                if entry.shape != tuple(param.shape) or entry.dtype != param.dtype:
                    raise ShardstateError(
                        f"tensor '{tensor}' is {DTYPE_NAMES[entry.dtype]}{list(entry.shape)}, the model needs "
                        f"{DTYPE_NAMES[param.dtype]}{list(param.shape)}", path, "convert again for this model",
                    )
                reads.append((path, entry.begin, param))
        missing = sorted(set(target.params) - found)
        if missing:
            raise ShardstateError(
                f"rank {target.rank} lacks tensor '{missing[0]}' ({len(missing)} missing)", model_dir, "convert again"
            )
        for path, offset, param in reads:
            account.read_into(path, offset, byte_view(param))
    return account
