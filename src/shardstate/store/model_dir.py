"""A model directory opened once: its config.json (read once), what kind of directory it is, and for a
sharded state its parsed manifest (or vLLM's rank files). Every entry point opens MODEL with
`open_model_dir` and passes the result down, to the loaders and (pickled) to the workers, so nothing
reads or checks the manifest twice."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import naming
from shardstate.format.checkpoint import open_checkpoint
from shardstate.format.config_json import read_config_json
from shardstate.format.dtypes import parse_dtype
from shardstate.format.sharded_state import ShardedState, is_sharded_state, open_sharded_state
from shardstate.io.reader import ReadAccount
from shardstate.io.s3 import RemoteFiles, connect_in_background, is_s3
from shardstate.store.remote import RemoteOrigin, fetch_metadata, fetch_rank_files


@dataclass(frozen=True)
class ModelDir:
    path: Path  # absolute
    config: dict  # config.json, parsed
    config_bytes: bytes
    config_path: Path
    state: ShardedState | None  # a sharded state (manifest checked against config.json) or vLLM's rank files
    remote: RemoteOrigin | None = None  # s3://: `path` is its node cache (small files; a state's rank files
    # are fetched into it on load, a HF checkpoint's weights read in place)

    def remote_weights(self) -> RemoteFiles | None:
        """What of the weight files is in object storage (a HF checkpoint in S3), for a ReadAccount."""
        return self.remote.remote_weights() if self.remote is not None else None

    def connect(self) -> None:
        """For an s3:// model, start making this process's S3 client (io/s3.py), before its first request."""
        if self.remote is not None:
            connect_in_background(self.remote.location)

    def errors_named(self) -> contextlib.AbstractContextManager[None]:
        """Errors in the block name an s3:// model's location, not its copy in the node cache."""
        return naming(self.path, self.remote.url) if self.remote is not None else contextlib.nullcontext()

    @property
    def kind(self) -> str:
        if self.state is None:
            return "hf"
        return "sharded" if self.state.manifest is not None else "vllm"


def open_model_dir(path: str | Path, cache_dir: str | os.PathLike[str] | None = None) -> ModelDir:
    """Read config.json and, for a sharded state, its manifest (refused if config.json is not the one its
    files were made for; a vLLM-written directory without one is accepted, strictly checked later). An
    `s3://bucket/prefix` location: a sharded state's manifest and side files are fetched into the
    node cache under `cache_dir` (store/remote.py), its rank files by each rank as it loads; a HF checkpoint's
    weight files are read in place by the loaders."""
    if is_s3(path):
        origin = fetch_metadata(str(path), cache_dir)
        with naming(origin.cache, origin.url):
            config, raw, config_path = read_config_json(origin.cache)
            state = None if origin.weights else open_sharded_state(origin.cache, config_bytes=raw)
        return ModelDir(origin.cache, config, raw, config_path, state, origin)
    path = Path(path).absolute()
    config, raw, config_path = read_config_json(path)
    state = open_sharded_state(path, allow_legacy=True, config_bytes=raw) if is_sharded_state(path) else None
    return ModelDir(path, config, raw, config_path, state)


def fetch_every_rank(directory: ModelDir) -> None:
    """An s3:// state's rank files, every rank's, into the node cache (for what reads them all here:
    verify, a reshard); nothing to do for a local directory."""
    if directory.remote is not None and directory.state is not None and directory.state.manifest is not None:
        for rank in range(directory.state.world_size):
            fetch_rank_files(directory.remote, directory.state.manifest, rank)


def resolve_dtype(requested: str | None, declared: torch.dtype | None, directory: ModelDir) -> torch.dtype:
    """What was asked for; else a sharded state's dtype (manifest, or a vLLM directory's weights); else
    `declared` (config.json's); else the weights' (read as the loaders read them: in place for a
    checkpoint in S3)."""
    if requested and requested != "auto":
        return parse_dtype(requested)
    if directory.state is not None:  # a sharded state holds exactly one dtype
        return directory.state.dtype
    if declared is not None:
        return declared
    with ReadAccount(directory.remote_weights()) as account:
        headers = open_checkpoint(directory.path, account).headers
    for header in headers:
        for entry in header.tensors.values():
            if entry.dtype.is_floating_point:
                return entry.dtype
    return torch.float32
