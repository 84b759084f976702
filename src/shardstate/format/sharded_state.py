"""A sharded-state directory as a reader sees it: the manifest, checked against config.json, and each
rank's files indexed and checked against the manifest and the tensors the reader needs.

A directory of `model-rank-R-part-P.safetensors` files without a manifest is accepted only as a
vLLM-written legacy state (its files carry no shardstate metadata); one whose files say shardstate wrote
them is a write that never finished, and is refused."""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import TensorLocation
from shardstate.format.manifest import MANIFEST_NAME, Manifest, read_manifest
from shardstate.format.safetensors_header import DTYPE_NAMES, DTYPES, read_header
from shardstate.format.safetensors_writer import WRITER_METADATA
from shardstate.io.files import read_regular
from shardstate.io.reader import ReadAccount

VLLM_SCALES = ("_q_scale", "_k_scale", "_v_scale", "_prob_scale")  # F32 1.0 scalars vLLM's files carry
LEGACY_FILE = re.compile(r"model-rank-(\d+)-part-(\d+)\.safetensors")


def vllm_scale_names(num_layers: int) -> list[str]:
    return [f"model.layers.{n}.self_attn.attn.{s}" for n in range(num_layers) for s in VLLM_SCALES]


@dataclass(frozen=True)
class ShardedState:
    root: Path
    manifest: Manifest | None  # None: a vLLM-written legacy directory
    tp_size: int
    dtype: torch.dtype
    legacy_files: dict[int, list[Path]]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def rank_paths(self, rank: int) -> list[Path]:
        if self.manifest is None:
            return self.legacy_files.get(rank, [])
        return [self.root / name for name in self.manifest.rank_files(rank)]


def _legacy_files(root: Path) -> dict[int, list[Path]]:
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in root.glob("model-rank-*-part-*.safetensors"):
        match = LEGACY_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match[1]), []).append((int(match[2]), path))
    return {rank: [p for _, p in sorted(parts)] for rank, parts in sorted(found.items())}


def is_sharded_state(root: Path) -> bool:
    return (root / MANIFEST_NAME).exists() or bool(_legacy_files(root))


def open_sharded_state(root: Path, allow_legacy: bool = False) -> ShardedState:
    """Read the manifest and refuse it if config.json is not the one the files were made for; without a
    manifest, accept a vLLM-written directory when `allow_legacy` (strict checks, no integrity)."""
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        if hashlib.sha256(read_regular(root / "config.json")).hexdigest() != manifest.config_sha256:
            raise ShardstateError(
                "config.json differs from the one the files were made for", root / MANIFEST_NAME,
                "restore config.json or convert again",
            )
        return ShardedState(root, manifest, manifest.tp_size, DTYPES[manifest.dtype], {})
    legacy = _legacy_files(root)
    headers = [read_header(paths[0]) for paths in legacy.values()]
    if not allow_legacy or not legacy or any(h.metadata.get("writer") == WRITER_METADATA["writer"] for h in headers):
        raise ShardstateError(
            "no shardstate.json (the directory is incomplete or not a sharded state)", root,
            "re-run `shardstate convert`",
        )
    if sorted(legacy) != list(range(len(legacy))):
        raise ShardstateError(f"rank files for ranks {sorted(legacy)}, not 0..N-1", root, "restore the missing ranks")
    dtypes = [e.dtype for h in headers for e in h.tensors.values() if e.dtype.is_floating_point and e.shape]
    return ShardedState(root, None, len(legacy), dtypes[0] if dtypes else torch.float32, legacy)


def check_inside(path: Path, root: Path) -> None:
    """Refuse a file that is, or leads through a link to, something outside the directory."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ShardstateError(f"{path.name} leads outside the directory (to {path.resolve()})", root,
                              "refusing it; replace the link with the file itself")


def warn_legacy(state: ShardedState) -> None:
    print(
        f"warning: {state.root} has no shardstate.json (written by vLLM?): loading at TP={state.tp_size} with "
        "strict key and shape checks, but its integrity cannot be checked",
        file=sys.stderr,
    )


def index_rank(
    state: ShardedState,
    rank: int,
    needs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    account: ReadAccount,
) -> dict[str, TensorLocation]:
    """Where each needed tensor of `rank` lies. Every file of the rank must exist; every tensor in it
    must appear once (and, with a manifest, be listed there for that file); needed tensors must have
    exactly the shape and dtype asked for; the only others allowed are vLLM's constant scales."""
    listed = state.manifest.tensors.get(str(rank), {}) if state.manifest else None
    found: dict[str, TensorLocation] = {}
    for path in state.rank_paths(rank):
        if not path.exists():
            raise ShardstateError(f"rank {rank} file {path.name} is missing", state.root, "convert again")
        check_inside(path, state.root)
        header = read_header(path)
        account.note_header(path, header.data_start)
        for tensor, entry in header.tensors.items():
            if listed is not None:
                record = listed.get(tensor)
                if record is None or record["file"] != path.name:
                    raise ShardstateError(f"unexpected tensor '{tensor}'", path, "the file does not match the manifest")
                constant = record["spec"].get("kind") == "constant"
            else:
                constant = tensor.endswith(VLLM_SCALES)
            if tensor in found:
                raise ShardstateError(f"tensor '{tensor}' appears twice", path, "the files are damaged")
            found[tensor] = TensorLocation(path, entry)
            if tensor not in needs:
                if not constant:
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
