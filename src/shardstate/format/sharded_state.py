"""A sharded-state directory as a reader sees it: the manifest, checked against config.json, and each
rank's files indexed and checked against the manifest and the tensors the reader needs.

A directory of `model-rank-R-part-P.safetensors` files without a manifest is accepted only as a
vLLM-written legacy state (its files carry no shardstate metadata); one whose files say shardstate wrote
them is a write that never finished, and is refused."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import ShardstateError, brief, failing_as
from shardstate.format.checkpoint import TensorLocation
from shardstate.format.manifest import (
    MANIFEST_NAME,
    WRITER,
    Manifest,
    is_constant,
    rank_file_metadata,
    read_manifest,
)
from shardstate.format.safetensors_header import DTYPE_NAMES, DTYPES, SafetensorsHeader, read_header
from shardstate.io.files import read_regular
from shardstate.io.reader import ReadAccount
from shardstate.parallel.pipeline import layout_name
from shardstate.spec import ShardSpec

VLLM_SCALES = ("_q_scale", "_k_scale", "_v_scale", "_prob_scale")  # F32 1.0 scalars vLLM's files carry
LEGACY_FILE = re.compile(r"model-rank-(\d+)-part-(\d+)\.safetensors")
LEGACY_PP_FILE = re.compile(r"model-pp-(\d+)-tp-(\d+)-part-(\d+)\.safetensors")  # vLLM's at PP>1


# Tied embeddings are saved as vLLM saves them, `lm_head.weight`; states from before kept the other name.
TIED_EARLIER_NAMES = {"model.embed_tokens.weight": "lm_head.weight"}


def model_name(tensor: str, needs: Collection[str]) -> str:
    """The model's name for a tensor of a saved state (a tied embedding saved under its earlier name)."""
    alias = TIED_EARLIER_NAMES.get(tensor)
    return alias if alias is not None and tensor not in needs and alias in needs else tensor


def vllm_scale_names(num_layers: int) -> list[str]:
    return [f"model.layers.{n}.self_attn.attn.{s}" for n in range(num_layers) for s in VLLM_SCALES]


@dataclass(frozen=True)
class ShardedState:
    root: Path
    manifest: Manifest | None  # None: a vLLM-written legacy directory
    tp_size: int
    dtype: torch.dtype
    legacy_files: dict[int, list[Path]]
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def rank_paths(self, rank: int) -> list[Path]:
        if self.manifest is None:
            return self.legacy_files.get(rank, [])
        return [self.root / name for name in self.manifest.rank_files(rank)]


def _legacy_files(root: Path) -> tuple[dict[int, list[Path]], int]:
    """vLLM's rank files by world rank, and the PP size: `model-rank-R-part-N`, or at PP>1
    `model-pp-P-tp-T-part-N` (world rank P * tp_size + T)."""
    found: dict[tuple[int, int], list[tuple[int, Path]]] = {}  # (pp, tp) -> (part, file)
    kinds = set()
    for path in root.glob("model-*-part-*.safetensors"):
        if match := LEGACY_FILE.fullmatch(path.name):
            stage, rank, part = 0, int(match[1]), int(match[2])
        elif match := LEGACY_PP_FILE.fullmatch(path.name):
            stage, rank, part = int(match[1]), int(match[2]), int(match[3])
        else:
            continue
        kinds.add(match.re)
        found.setdefault((stage, rank), []).append((part, path))
    if len(kinds) > 1:
        raise ShardstateError("both vLLM's TP-only and its PP rank file names", root, "keep one state per directory")
    tp_size = 1 + max((tp for _, tp in found), default=-1)
    pp_size = 1 + max((pp for pp, _ in found), default=0)
    return {pp * tp_size + tp: [p for _, p in sorted(parts)] for (pp, tp), parts in sorted(found.items())}, pp_size


def is_sharded_state(root: Path) -> bool:
    return (root / MANIFEST_NAME).exists() or bool(_legacy_files(root)[0])


def open_sharded_state(root: Path, allow_legacy: bool = False, config_bytes: bytes | None = None) -> ShardedState:
    """Read the manifest and refuse it if config.json (`config_bytes`, when already read) is not the one the
    files were made for; without a manifest, accept a vLLM-written directory when `allow_legacy` (strict
    checks, no integrity)."""
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        config = config_bytes
        if config is None:
            with failing_as("cannot read config.json", root / "config.json", "restore it from the source"):
                config = read_regular(root / "config.json")
        if hashlib.sha256(config).hexdigest() != manifest.config_sha256:
            raise ShardstateError(
                "config.json differs from the one the files were made for", root / MANIFEST_NAME,
                "restore config.json or convert again",
            )
        return ShardedState(root, manifest, manifest.tp_size, DTYPES[manifest.dtype], {}, manifest.pp_size)
    legacy, pp_size = _legacy_files(root)
    headers = [read_header(paths[0]) for paths in legacy.values()]
    if not allow_legacy or not legacy or any(h.metadata.get("writer") == WRITER for h in headers):
        raise ShardstateError(
            "no shardstate.json (the directory is incomplete or not a sharded state)", root,
            "re-run `shardstate convert`",
        )
    if sorted(legacy) != list(range(len(legacy))):
        raise ShardstateError(f"rank files for ranks {sorted(legacy)}, not 0..N-1", root, "restore the missing ranks")
    dtypes = [e.dtype for h in headers for e in h.tensors.values() if e.dtype.is_floating_point and e.shape]
    return ShardedState(root, None, len(legacy) // pp_size, dtypes[0] if dtypes else torch.float32, legacy, pp_size)


def check_inside(path: Path, root: Path) -> None:
    """Refuse a file that is, or leads through a link to, something outside the directory."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ShardstateError(f"{path.name} leads outside the directory (to {path.resolve()})", root,
                              "refusing it; replace the link with the file itself")


def warn_legacy(state: ShardedState) -> None:
    print(
        f"warning: {state.root} has no shardstate.json (written by vLLM?): loading at "
        f"{layout_name(state.tp_size, state.pp_size)} with "
        "strict key and shape checks, but its integrity cannot be checked",
        file=sys.stderr,
    )


def check_rank_file(manifest: Manifest, path: Path, header: SafetensorsHeader, size: int | None = None) -> None:
    """A listed rank file against the manifest: its own record of state, rank, TP size and part (its
    safetensors metadata), its size, and exactly the tensors, dtypes and shapes listed for it."""
    record = manifest.files[path.name]
    expected = rank_file_metadata(manifest.state_id, record["rank"], manifest.tp_size, record["part"], manifest.pp_size)
    for key, value in expected.items():
        found = header.metadata.get(key)
        if found != value:
            said = f"records {key}={brief(found)}" if found is not None else f"records no {key}"
            raise ShardstateError(f"{path.name} {said}, the manifest says {key}={value}", path,
                                  "the file belongs to another state or rank; re-create the sharded state")
    listed = {t: r for t, r in manifest.tensors[str(record["rank"])].items() if r["file"] == path.name}
    for tensor, entry in header.tensors.items():
        if tensor not in listed:
            raise ShardstateError(f"unexpected tensor '{tensor}'", path, "the file does not match the manifest")
        found = (DTYPE_NAMES[entry.dtype], list(entry.shape))
        wanted = (listed[tensor]["dtype"], listed[tensor]["shape"])
        if found != wanted:
            raise ShardstateError(f"tensor '{tensor}' is {found[0]}{found[1]}, manifest says {wanted[0]}{wanted[1]}",
                                  path, "re-create the sharded state")
    lacking = sorted(set(listed) - set(header.tensors))
    if lacking:
        raise ShardstateError(f"lacks tensor '{lacking[0]}' ({len(lacking)} missing)", path,
                              "re-create the sharded state")
    size = path.stat().st_size if size is None else size  # `size`: of an object, read in place
    if size != record["size"]:
        raise ShardstateError(f"size {size}, manifest says {record['size']}", path, "re-create the sharded state")


def check_specs(manifest: Manifest, stage_specs: dict[str, ShardSpec] | list[dict[str, ShardSpec] | None],
                path: Path) -> None:
    """Every rank's tensors are exactly the model's parameters (plus constants), each recorded with the
    spec the model would cut it with: a state laid out for another model is refused before loading.
    `stage_specs`: the model's specs, or at PP>1 each stage's (None: not checked)."""
    opaque = next((name for tensors in manifest.tensors.values() for name, record in tensors.items()
                   if record["spec"] is None), None)  # on any rank: a later one alone was let through
    if opaque is not None:
        raise ShardstateError(
            f"tensor '{opaque}' has no recorded layout (an opaque entry, written inside vLLM for a model "
            "shardstate has no specs for)", path,
            f"load it in vLLM (--load-format shardstate) at TP={manifest.tp_size}",
        )
    for rank, recorded in manifest.specs.items():
        specs = stage_specs[int(rank) // manifest.tp_size] if isinstance(stage_specs, list) else stage_specs
        if specs is None:  # a stage not checked here (another process loads it)
            continue
        params = {model_name(n, specs): n for n in recorded}
        if set(params) != set(specs):
            extra, lacking = sorted(set(params) - set(specs)), sorted(set(specs) - set(params))
            raise ShardstateError(
                f"rank {rank}'s tensors are not this model's parameters (extra {brief(extra[:2])}, missing "
                f"{brief(lacking[:2])})", path, "convert again for this model",
            )
        for name, saved_name in params.items():
            if recorded[saved_name] != specs[name]:
                raise ShardstateError(f"tensor '{name}' of rank {rank} is recorded with another layout than this "
                                      "model's", path, "convert again with this shardstate for this model")


def index_rank(
    state: ShardedState,
    rank: int,
    needs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    account: ReadAccount,
) -> dict[str, TensorLocation]:
    """Where each needed tensor of `rank` lies. Every file of the rank must exist; every tensor in it
    must appear once (and, with a manifest, be listed there for that file); needed tensors must have
    exactly the shape and dtype asked for; the only others allowed are the constants vLLM's loader needs."""
    listed = state.manifest.tensors[str(rank)] if state.manifest else None
    found: dict[str, TensorLocation] = {}
    for path in state.rank_paths(rank):
        remote = account.remote is not None and account.remote.holds(path)  # an object, read in place
        if not remote and not path.exists():
            raise ShardstateError(f"rank {rank} file {path.name} is missing", state.root, "convert again")
        if not remote:
            check_inside(path, state.root)
        reader = account.reader(path) if remote else None
        header = read_header(path, reader)
        account.note_header(path, header.data_start)
        if state.manifest is not None:
            check_rank_file(state.manifest, path, header, reader.size if reader is not None else None)
        for saved_name, entry in header.tensors.items():
            listed_constant = listed is not None and is_constant(listed[saved_name]["spec"])
            constant = listed_constant if listed is not None else saved_name.endswith(VLLM_SCALES)
            tensor = model_name(saved_name, needs)
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
