"""Load strategies, one file each, one registry; all driven by the model's ShardSpecs."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from shardstate.errors import ShardstateError
from shardstate.loaders.base import LoadReport, LoadTarget
from shardstate.loaders.default import load_default
from shardstate.loaders.sliced import load_sliced

LOADERS = {"default": load_default, "sliced": load_sliced}


def load_weights(load_format: str, model: nn.Module, model_dir: str | Path, rank: int) -> LoadReport:
    """Fill `model`'s materialised parameters from `model_dir` with the named strategy; time it."""
    try:
        loader = LOADERS[load_format]
    except KeyError:
        raise ShardstateError(
            f"unknown load format '{load_format}'", None, f"use one of {', '.join(LOADERS)}"
        ) from None
    start = time.perf_counter()
    account = loader(LoadTarget.of(model, rank), Path(model_dir))
    return LoadReport(rank, time.perf_counter() - start, account.bytes_read, account.files)


__all__ = ["LOADERS", "LoadReport", "load_weights"]
