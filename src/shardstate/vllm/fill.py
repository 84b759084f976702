"""Filling a cache entry from live tensor-parallel ranks (vLLM's parameters right after its default loader,
before post-processing), race-safe:

1. The ranks find out who shares their cache directory (a probe file each, then a look): with one shared
   directory, one builder for all ranks; with node-local ones, one per node, each holding its ranks' files.
2. The lowest rank of each directory takes the entry's lock without waiting. If any directory's lock is
   held by another process (another server building the same entry), nobody writes: the weights are
   loaded already, and waiting would only delay this start.
3. Each rank writes its files into the staging directory (crc32 and per-tensor xxh3 on the way), the ranks
   exchange their records, and all compute the same manifest and state id; each stamps its own files.
4. The builder of each directory copies the side files, writes key.json and the manifest (last), and
   renames the staging directory into place: the entry appears whole or not at all.

Every step ends in a collective that every rank reaches, whatever happened on it: failures are values."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.format.config_json import CONFIG_NAME
from shardstate.format.manifest import (
    PENDING_STATE_ID,
    PP1_PATTERN,
    Manifest,
    constant_spec,
    rank_file_metadata,
    state_id_of,
    write_manifest,
)
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import OutTensor, RankWriter, split_into_parts
from shardstate.spec import ShardSpec, spec_to_json
from shardstate.store.cache import KEY_NAME, CacheEntry, EntryLock, key_document, publish, sweep
from shardstate.store.writer import copy_file, is_side_file, stamp_state_id, write_file
from shardstate.vllm.ranks import Ranks

MAX_PART_BYTES = 5 << 30
CONSTANT_SHAPES = ((), (1,))


@dataclass(frozen=True)
class Checkpoint:
    """What the manifest says of the model an entry was filled from."""

    directory: Path
    architecture: str
    dtype: torch.dtype
    specs: dict[str, ShardSpec] | None  # shardstate's layout of this model, when it has one


def fill_entry(entry: CacheEntry, fields: dict, tensors: dict[str, torch.Tensor], ranks: Ranks,
               checkpoint: Checkpoint, log: Callable[[str], None], replace: bool = False) -> bool:
    """Write this rank's `tensors` (name -> tensor, vLLM's state without aliases) into `entry`; True on
    every rank if the entry was published. An entry published meanwhile by another process is kept,
    unless `replace` (this one was found damaged, or a refresh was asked for)."""
    _attempt(lambda: entry.root.mkdir(parents=True, exist_ok=True))  # a failure shows in the steps below
    token = str(ranks.first(secrets.token_hex(8)))
    sharing = _sharing(entry.root, token, ranks)
    builder = sharing[0] == ranks.rank
    lock = EntryLock(entry)
    staging = entry.staging(token)
    try:
        claimed = _attempt(lambda: _claim(lock, entry, staging, None if replace else fields)) if builder else True
        failed = _first_failure(ranks.all_gather(claimed))
        if failed is None:
            written = _attempt(lambda: _write_rank(staging, ranks, tensors, checkpoint))
            results = ranks.all_gather(written)
            failed = _first_failure(results)
            manifest = None if failed else _manifest(results, checkpoint)
            stamped = _attempt(lambda: _stamp(staging, manifest, ranks.rank)) if manifest else failed
            crcs = ranks.all_gather(stamped)
            failed = _first_failure(crcs)
            if failed is None:
                for rank_crcs in crcs:
                    for name, crc in rank_crcs.items():
                        manifest.files[name]["crc32"] = crc
            done = _attempt(lambda: _finish(entry, staging, token, manifest, fields, sharing, checkpoint)) \
                if builder and failed is None else failed
            failed = _first_failure(ranks.all_gather(done))
        if failed is not None and ranks.rank == 0:
            log(f"the cache entry {entry.path} was not filled: {failed}")
        return failed is None
    finally:
        if builder:
            shutil.rmtree(staging, ignore_errors=True)
            lock.release()


def _first_failure(results: list) -> str | None:
    return next((r for r in results if isinstance(r, str)), None)


def _attempt(step: Callable[[], object]) -> object:
    """The step's result, or what went wrong as one line (shared with the other ranks)."""
    try:
        result = step()
    except Exception as exc:  # the server has its weights already: the cache never fails it
        return f"{type(exc).__name__}: {exc}"
    return True if result is None else result


def _sharing(root: Path, token: str, ranks: Ranks) -> list[int]:
    """The ranks that see the same cache directory as this one (each leaves a probe, then looks)."""
    probe = root / f".probe-{token}-{ranks.rank}"
    made = _attempt(lambda: probe.touch(exist_ok=False))
    ranks.barrier()
    seen = sorted(int(p.name.rsplit("-", 1)[1]) for p in root.glob(f".probe-{token}-*")) if made is True else []
    ranks.barrier()
    probe.unlink(missing_ok=True)
    return seen if ranks.rank in seen else [ranks.rank]


def _claim(lock: EntryLock, entry: CacheEntry, staging: Path, keep: dict | None) -> str | None:
    """The lock, and a fresh staging directory; why not, as a line. `keep`: the fields of an entry that,
    if another process published it meanwhile, is kept as it is."""
    if not lock.acquire():
        return f"another process is building the cache entry {entry.path}; not filling it from here"
    existing = entry.key()
    if keep is not None and existing is not None and existing["fields"] == keep:
        return f"another process filled the cache entry {entry.path} meanwhile; kept"
    sweep(entry)
    staging.mkdir()
    return None


def _write_rank(staging: Path, ranks: Ranks, tensors: dict[str, torch.Tensor], checkpoint: Checkpoint) -> dict:
    planned = [OutTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    parts = split_into_parts(planned, MAX_PART_BYTES)
    writer = RankWriter(staging, ranks.rank, parts, PP1_PATTERN,
                        lambda part: rank_file_metadata(PENDING_STATE_ID, ranks.rank, ranks.size, part))
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor.detach().cpu())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    records = {}
    for part, planned_part in enumerate(parts):
        for t in planned_part:
            spec, global_shape = _spec_json(t, tensors[t.name], checkpoint)
            records[t.name] = {
                "file": PP1_PATTERN.format(rank=ranks.rank, part=part), "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape), "global_shape": global_shape, "spec": spec,
                "xxh3_64": writer.digests[t.name],
            }
    return {"files": writer.files, "tensors": records}


def _spec_json(planned: OutTensor, tensor: torch.Tensor, checkpoint: Checkpoint) -> tuple[dict | None, list[int]]:
    """The manifest's spec and global shape of a tensor: shardstate's spec when the layout is shardstate's
    (name, shape and dtype as the family's), a constant for a uniform scalar, else None (opaque: loadable
    only at this layout)."""
    spec = (checkpoint.specs or {}).get(planned.name)
    if spec is not None and spec.local_shape() == planned.shape and planned.dtype == checkpoint.dtype:
        return spec_to_json(spec), list(spec.global_shape())
    if planned.shape in CONSTANT_SHAPES and planned.dtype in (torch.float32, checkpoint.dtype):
        values = tensor.detach().cpu().reshape(-1).unique()
        if len(values) == 1:
            return constant_spec(float(values[0])), list(planned.shape)
    return None, list(planned.shape)


def _manifest(results: list[dict], checkpoint: Checkpoint) -> Manifest:
    """The same manifest on every rank (from everyone's records), with its content-derived id."""
    config = (checkpoint.directory / CONFIG_NAME).read_bytes()
    tensors = {str(rank): result["tensors"] for rank, result in enumerate(results)}
    manifest = Manifest(
        PENDING_STATE_ID, len(results), checkpoint.architecture, hashlib.sha256(config).hexdigest(),
        DTYPE_NAMES[checkpoint.dtype], _source(checkpoint.directory), _side_files(checkpoint.directory),
        files={name: dict(record) for result in results for name, record in result["files"].items()},
        tensors=tensors,
    )
    manifest.state_id = state_id_of(manifest)
    return manifest


def _source(directory: Path) -> list[dict]:
    return [{"name": p.name, "size": p.stat().st_size} for p in sorted(directory.iterdir())
            if p.is_file() and p.name.endswith(".safetensors")]


def _side_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_side_file(p))


def _stamp(staging: Path, manifest: Manifest, rank: int) -> dict[str, int]:
    """This rank's files stamped with the state's id; their crc32s after."""
    return {name: stamp_state_id(staging / name, manifest.state_id, manifest.files[name]["crc32"],
                                 manifest.files[name]["size"])
            for name in manifest.rank_files(rank)}


def _finish(entry: CacheEntry, staging: Path, token: str, manifest: Manifest, fields: dict, sharing: list[int],
            checkpoint: Checkpoint) -> None:
    for name in manifest.side_files:
        copy_file(checkpoint.directory / name, staging / name)
    write_file(staging / KEY_NAME, [json.dumps(key_document(fields, sharing), indent=1).encode()])
    write_manifest(staging, manifest)
    publish(entry, staging, token)
