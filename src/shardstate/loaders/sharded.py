"""`sharded`: each rank opens only its own files of a sharded state and reads them into memory that its
parameters become views of (io/engine.py: read, mmap or direct). Everything is checked against the
manifest and the model before a weight is read. A vLLM-written directory (no manifest) loads at its own
TP size with the same strict key/shape checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import TensorLocation
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import tensor_digest
from shardstate.format.sharded_state import (
    ShardedState,
    check_specs,
    index_rank,
    warn_legacy,
)
from shardstate.io.digests import Expected, StreamingDigests, digest_mismatch
from shardstate.io.engine import Span, read_spans, read_spans_to_device
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget
from shardstate.loaders.resharded import load_resharded
from shardstate.parallel.pipeline import layout_name
from shardstate.spec import ShardSpec
from shardstate.store.model_dir import ModelDir
from shardstate.store.remote import load_rank_files

Stages = list[dict[str, torch.Tensor]]  # each pipeline stage's parameters (on meta, each with its `.spec`)


def open_for_load(directory: ModelDir, specs: dict[str, ShardSpec] | list[dict[str, ShardSpec] | None],
                  dtype: torch.dtype, verify: bool, saved: Stages | None = None) -> ShardedState:
    """The directory's sharded state, refused unless a model with `specs` (each stage's at PP>1; None for a
    stage not checked here) running `dtype` can load it: same dtype, every tensor recorded with the model's
    own layout at the saved layout; at another layout than the running one, only with `saved` (the model as
    saved: resharded on load) and a manifest (whose specs say how the saved tensors were cut)."""
    state, model_dir = directory.state, directory.path
    if state is None:
        raise ShardstateError("no shardstate.json (the directory is incomplete or not a sharded state)", model_dir,
                              "re-run `shardstate convert`")
    stage_specs = specs if isinstance(specs, list) else [specs]
    running = next(iter(next(s for s in stage_specs if s is not None).values())).tp_size, len(stage_specs)
    if (state.tp_size, state.pp_size) != running and (state.manifest is None or saved is None):
        why = (": a directory without shardstate.json (written by vLLM?) records no specs to reshard from"
               if state.manifest is None else "")
        raise ShardstateError(
            f"saved for {layout_name(state.tp_size, state.pp_size)}, running {layout_name(*running)}{why}",
            model_dir, f"run with {layout_name(state.tp_size, state.pp_size, True)}, or "
                       f"`shardstate convert {model_dir} OUT {layout_name(*running, True)}`",
        )
    if state.dtype != dtype:
        saved = DTYPE_NAMES[state.dtype]
        raise ShardstateError(
            f"saved as {saved}, running {DTYPE_NAMES[dtype]}", model_dir,
            f"run with --dtype {saved}, or convert with --dtype",
        )
    if verify and state.manifest is None:
        raise ShardstateError("--verify needs checksums, and a directory without shardstate.json has none",
                              model_dir, "load without --verify, or convert it into a sharded state first")
    if state.manifest is not None:
        check_specs(state.manifest, stage_specs if saved is None else [{n: p.spec for n, p in params.items()}
                                                                       for params in saved], state.manifest_path)
    return state


def check_before_workers(directory: ModelDir, params: dict[str, torch.Tensor] | Stages, dtype: torch.dtype,
                         verify: bool, saved: Stages | None = None) -> None:
    """What the driver checks before it starts any worker: `open_for_load`, and every saved rank's file
    headers against the manifest and the model's parameters (`params`, each stage's at PP>1, on the meta
    device, each with its `.spec`; a state at another layout against `saved`; the workers check their own
    again)."""
    stages = params if isinstance(params, list) else [params]
    state = open_for_load(directory, [{name: p.spec for name, p in s.items()} for s in stages], dtype, verify, saved)
    if directory.remote is not None:  # the rank files are not here yet: each rank checks its own as it loads
        return
    as_saved = stages if saved is None else saved
    with ReadAccount() as account:
        for rank in range(state.world_size):
            index_rank(state, rank, needs_of(as_saved[rank // state.tp_size]), account)


def rebinds_parameters(directory: ModelDir, load_format: str, layout: tuple[int, int]) -> bool:
    """The sharded loader at the state's own (tp, pp) `layout`: the parameters become views of the memory it
    reads into (or maps), not copies."""
    state = directory.state
    return load_format == "sharded" and state is not None and (state.tp_size, state.pp_size) == layout


def read_arena_bytes(directory: ModelDir, rank: int, io_mode: str) -> int:
    """What world rank `rank`'s sharded read (at the state's layout) reads into one arena: its files' sizes
    (every span lies within its file; an s3:// state's files are read whole, from the node cache or the
    store) plus each region's alignment, an upper bound; 0 where it reads into no arena of its own (mmap,
    direct)."""
    state = directory.state
    if state is None or io_mode != "read" or (directory.remote is not None and state.manifest is None):
        return 0
    if state.manifest is not None:
        return sum(state.manifest.files[name]["size"] + 64 for name in state.manifest.rank_files(rank))
    try:
        return sum(path.stat().st_size + 64 for path in state.rank_paths(rank))
    except OSError:  # the load names what is missing
        return 0


def needs_of(params: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each tensor's shape and dtype in the rank files: the parameters' own."""
    return {name: (tuple(p.shape), p.dtype) for name, p in params.items()}


def load_sharded(target: LoadTarget, directory: ModelDir) -> ReadAccount:
    dtype = next(iter(target.params.values())).dtype
    specs = [target.specs if stage == target.stage else None for stage in range(target.pp_size)]
    state = open_for_load(directory, specs, dtype, target.io.verify, target.saved)
    if (state.tp_size, state.pp_size) != (target.tp_size, target.pp_size):
        return load_resharded(target, directory, state)
    if state.manifest is None and target.file_rank == 0:
        warn_legacy(state)
    needs = needs_of(target.params)
    with ReadAccount() as account:
        io = target.io
        fetched: dict[Path, torch.Tensor] = {}  # an s3:// state's files: whole, in memory, crc32 checked
        if directory.remote is not None and state.manifest is not None:
            fetched = load_rank_files(directory.remote, state.manifest, target.file_rank, account, io.threads,
                                      io.memory)
        locations = index_rank(state, target.file_rank, needs, account)
        by_file: dict[Path, list[str]] = {}
        for name, location in locations.items():
            by_file.setdefault(location.file, []).append(name)
        # One span per file, from its first to its last needed byte (vLLM's trailing scales left out).
        spans = [
            Span(path, min(locations[n].entry.begin for n in names), max(locations[n].entry.end for n in names))
            for path, names in sorted(by_file.items()) if path not in fetched
        ]
        records = state.manifest.tensors[str(target.file_rank)] if io.verify else {}
        on_disk = {name: location for name, location in locations.items() if location.file not in fetched}
        streaming = expected_digests(records, on_disk) if io.verify and io.mode == "read" else None
        if io.device != "cpu" and io.mode == "read":
            memory = read_spans_to_device(spans, torch.device(io.device), account, digests=streaming,
                                              threads=io.threads)
        else:
            # the reserved memory holds the fetched files already: another read into it would overwrite them
            memory = read_spans(spans, io.mode, account, io.threads, streaming, None if fetched else io.memory)
        spans += [Span(path, 0, len(data)) for path, data in fetched.items()]
        for span, data in zip(spans, [*memory, *fetched.values()], strict=True):
            for name in by_file.get(span.path, ()):  # a fetched file may hold only constants
                entry = locations[name].entry
                raw = data[entry.begin - span.start : entry.end - span.start]
                param = target.params[name]
                if raw.storage_offset() % entry.dtype.itemsize:  # misaligned in a foreign file: copy once
                    param.data = torch.empty_like(param, device=raw.device)
                    param.data.view(-1).view(torch.uint8).copy_(raw)
                else:
                    param.data = raw.view(entry.dtype).view(entry.shape)
        if io.verify:  # what was not checked while read (fetched files; all with mmap and direct): hash it now
            unchecked = locations if streaming is None else {n: loc for n, loc in locations.items() if n not in on_disk}
            check_digests(records, target.params, unchecked, io.threads)
    return account


def expected_digests(records: dict[str, dict], locations: dict[str, TensorLocation]) -> StreamingDigests:
    """What the read path checks as bytes arrive: each tensor's range in its file and recorded digest."""
    by_file: dict[Path, list[Expected]] = {}
    for name, location in locations.items():
        entry = location.entry
        by_file.setdefault(location.file, []).append(
            Expected(name, entry.begin, entry.end, records[entry.name]["xxh3_64"])  # entry.name: the saved name
        )
    return StreamingDigests(by_file)


def check_digests(records: dict[str, dict], params: dict, locations: dict[str, TensorLocation], threads: int) -> None:
    """Every loaded tensor at `locations` against the digest its writer recorded (after the load, for
    what was not checked while read); the first mismatch is named."""
    def check(name: str) -> None:
        expected = records[locations[name].entry.name]["xxh3_64"]
        data = params[name].data.detach().cpu().reshape(-1).view(torch.uint8)
        if tensor_digest(memoryview(data.numpy())) != expected:
            raise digest_mismatch(name, locations[name].file)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(check, locations))
