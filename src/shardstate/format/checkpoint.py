"""A Hugging Face checkpoint directory: config.json plus one or many *.safetensors files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from shardstate.format.strict_json import loads_strict
from shardstate.io.files import read_regular
from shardstate.io.reader import ReadAccount
from shardstate.io.s3 import RemoteFiles

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorLocation:
    file: Path
    entry: TensorEntry


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a checkpoint and the file that holds it; files in name order."""

    root: Path
    headers: tuple[SafetensorsHeader, ...]
    tensors: dict[str, TensorLocation]


def find_weight_files(root: Path, remote: RemoteFiles | None = None) -> list[Path]:
    """The checkpoint's safetensors files: from the index when there is one, else every *.safetensors
    (with `remote`, the objects it holds stand for the files of `root`)."""
    if not root.is_dir():
        raise ShardstateError("not a directory", root, "pass a Hugging Face model directory")
    index_path = root / INDEX_NAME
    if index_path.exists():
        try:
            weight_map = loads_strict(read_regular(index_path))["weight_map"]
            names = sorted(set(weight_map.values()))
        except ValueError as exc:
            raise ShardstateError(f"invalid index ({exc})", index_path, "re-create the checkpoint index") from None
        except (KeyError, TypeError, AttributeError):
            raise ShardstateError(
                "invalid index (no weight_map object)", index_path, "re-create the checkpoint index"
            ) from None
        files = []
        for name in names:
            file = root / name
            present = remote.holds(file) if remote is not None else file.is_file()
            if Path(name).name != name or not present:
                raise ShardstateError(
                    f"index names '{name}', which is not a file of the checkpoint", index_path,
                    "restore the missing file or re-create the index",
                )
            files.append(file)
        return files
    files = sorted(root.glob("*.safetensors")) if remote is None else sorted(root / name for name in remote.objects)
    if files:
        return files
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ShardstateError(
            f"only pickle weights ({', '.join(pickled)}); shardstate never unpickles", root,
            "convert them to safetensors first (transformers: save_pretrained(..., safe_serialization=True))",
        )
    raise ShardstateError("no *.safetensors weight files", root, "pass a Hugging Face model directory")


def open_checkpoint(root: str | Path, account: ReadAccount | None = None) -> Checkpoint:
    """Read and validate every header (through `account`: object storage where it says so); a tensor
    present in two files is refused."""
    root = Path(root)
    files = find_weight_files(root, account.remote if account is not None else None)
    headers = tuple(read_header(f, account.reader(f) if account is not None else None) for f in files)
    tensors: dict[str, TensorLocation] = {}
    for header in headers:
        for name, entry in header.tensors.items():
            if name in tensors:
                raise ShardstateError(
                    f"tensor '{name}' appears twice (also in {tensors[name].file.name})", header.path,
                    "remove the duplicate file",
                )
            tensors[name] = TensorLocation(header.path, entry)
    return Checkpoint(root, headers, tensors)
