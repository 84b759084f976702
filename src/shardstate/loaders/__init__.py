"""Load strategies, one file each, one registry; all driven by the model's ShardSpecs."""

from __future__ import annotations

import time

import torch
from torch import nn

from shardstate.errors import ShardstateError
from shardstate.io.arena import enabled
from shardstate.loaders.base import IOOptions, LoadReport, LoadTarget
from shardstate.loaders.default import load_default
from shardstate.loaders.scatter import load_scatter
from shardstate.loaders.sharded import load_sharded, read_arena_bytes, rebinds_parameters
from shardstate.loaders.sliced import load_sliced
from shardstate.memory import peak_rss_bytes
from shardstate.store.model_dir import ModelDir

LOADERS = {"default": load_default, "sliced": load_sliced, "scatter": load_scatter, "sharded": load_sharded}
LOAD_FORMATS = ("auto", *LOADERS)


def resolve_load_format(load_format: str, directory: ModelDir) -> str:
    """`auto`: sharded when MODEL is a sharded state (a manifest, or vLLM's rank files), else default."""
    if load_format == "auto":
        return "default" if directory.state is None else "sharded"
    if load_format not in LOADERS:
        raise ShardstateError(f"unknown load format '{load_format}'", None, f"use one of {', '.join(LOAD_FORMATS)}")
    if load_format != "sharded" and directory.state is not None:
        raise ShardstateError(f"--load-format {load_format} reads Hugging Face checkpoints; this is a sharded state",
                              directory.path, "use --load-format sharded (or auto)")
    return load_format


def memory_to_reserve(directory: ModelDir, load_format: str, rank: int, io_mode: str, layout: tuple[int, int],
                      parameter_bytes: int, quantize: bool) -> int:
    """What world rank `rank`'s worker reserves as it starts (io/arena.py: faulted in while it imports
    torch, joins its group and builds its model): the sharded read's arena where parameters become views
    of it, else the parameters' own memory, which the other loaders (and a reshard) copy into. 0 with
    SHARDSTATE_PREFAULT=0, on a GPU, and with --quantize (its weights replace the loaded ones, which one
    arena would keep alive)."""
    if not enabled("SHARDSTATE_PREFAULT") or torch.cuda.is_available():
        return 0
    if rebinds_parameters(directory, load_format, layout):
        return read_arena_bytes(directory, rank, io_mode)
    return 0 if quantize else parameter_bytes


def load_weights(
    load_format: str, model: nn.Module, directory: ModelDir, rank: int, io: IOOptions | None = None,
    saved: list[dict[str, torch.Tensor]] | None = None,
) -> LoadReport:
    """Fill `model`'s materialised parameters from `model_dir` with the named strategy and move them to
    `io.device` (a no-op for parameters the sharded loader put there); time both. `saved`: a sharded
    state's parameters per stage as saved (on meta, with their specs), when its layout is not the model's
    (resharded while loading)."""
    target = LoadTarget.of(model, rank, io, saved)
    loader = LOADERS[resolve_load_format(load_format, directory)]
    start = time.perf_counter()
    account = loader(target, directory)
    fetch = account.fetch_report
    device = torch.device(target.io.device)
    if device.type != "cpu":
        model.to(device)
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak_rss = peak_rss_bytes()
    state = directory.state if saved is not None else None  # resharded from that state's layout
    resharded_from = None if state is None else state.tp_size
    return LoadReport(target.file_rank, seconds, account.bytes_read, account.files, account.bytes_mapped, peak_rss,
                      fetch.bytes_fetched, fetch.fetched, fetch.cached, fetch.seconds, resharded_from,
                      account.unverified, None if state is None else state.pp_size)


__all__ = ["LOADERS", "LOAD_FORMATS", "IOOptions", "LoadReport", "load_weights", "memory_to_reserve",
           "resolve_load_format"]
