"""`sharded`: each rank opens only its own files of a sharded state and reads every tensor straight
into its parameter. Everything is checked against the manifest and the model before a weight is read.
A vLLM-written directory (no manifest) loads at its own TP size with the same strict key/shape checks."""

from __future__ import annotations

from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.sharded_state import index_rank, open_sharded_state, warn_legacy
from shardstate.io.reader import ReadAccount, byte_view
from shardstate.loaders.base import LoadTarget


def load_sharded(target: LoadTarget, model_dir: Path) -> ReadAccount:
    state = open_sharded_state(model_dir, allow_legacy=True)
    saved_tp = state.tp_size
    if saved_tp != target.tp_size:
        raise ShardstateError(
            f"saved for TP={saved_tp}, running TP={target.tp_size}", model_dir,
            f"run `shardstate convert {model_dir} OUT --tp {target.tp_size}`",
        )
    dtype = next(iter(target.params.values())).dtype
    if state.dtype != dtype:
        saved = DTYPE_NAMES[state.dtype]
        raise ShardstateError(
            f"saved as {saved}, running {DTYPE_NAMES[dtype]}", model_dir,
            f"run with --dtype {saved}, or convert with --dtype",
        )
    if state.manifest is None and target.rank == 0:
        warn_legacy(state)
    needs = {name: (tuple(p.shape), p.dtype) for name, p in target.params.items()}
    with ReadAccount() as account:
        locations = index_rank(state, target.rank, needs, account)
        for name, location in sorted(locations.items(), key=lambda item: (str(item[1].file), item[1].entry.begin)):
            account.read_into(location.file, location.entry.begin, byte_view(target.params[name]))
    return account
