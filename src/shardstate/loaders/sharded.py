"""`sharded`: each rank opens only its own files of a sharded state and reads them into memory that its
parameters become views of (io/engine.py: read, mmap or direct). Everything is checked against the
manifest and the model before a weight is read. A vLLM-written directory (no manifest) loads at its own
TP size with the same strict key/shape checks."""

from __future__ import annotations

from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import tensor_digest
from shardstate.format.sharded_state import index_rank, open_sharded_state, warn_legacy
from shardstate.io.engine import Span, read_spans, read_spans_to_device
from shardstate.io.reader import ReadAccount
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
    if target.io.verify and state.manifest is None:
        raise ShardstateError("--verify needs checksums, and a directory without shardstate.json has none",
                              model_dir, "load without --verify, or convert it into a sharded state first")
    needs = {name: (tuple(p.shape), p.dtype) for name, p in target.params.items()}
    with ReadAccount() as account:
        locations = index_rank(state, target.rank, needs, account)
        by_file: dict[Path, list[str]] = {}
        for name, location in locations.items():
            by_file.setdefault(location.file, []).append(name)
        # One span per file, from its first to its last needed byte (vLLM's trailing scales left out).
        spans = [
            Span(path, min(locations[n].entry.begin for n in names), max(locations[n].entry.end for n in names))
            for path, names in sorted(by_file.items())
        ]
        io = target.io
        if io.device != "cpu" and io.mode == "read":
            memory = read_spans_to_device(spans, torch.device(io.device), account)
        else:
            memory = read_spans(spans, io.mode, account, io.threads)
        for span, data in zip(spans, memory, strict=True):
            for name in by_file[span.path]:
                entry = locations[name].entry
                raw = data[entry.begin - span.start : entry.end - span.start]
                param = target.params[name]
                if raw.storage_offset() % entry.dtype.itemsize:  # misaligned in a foreign file: copy once
                    param.data = torch.empty_like(param, device=raw.device)
                    param.data.view(-1).view(torch.uint8).copy_(raw)
                else:
                    param.data = raw.view(entry.dtype).view(entry.shape)
        if target.io.verify:
            check_digests(state.manifest.tensors[str(target.rank)], target.params, locations)
    return account


def check_digests(records: dict[str, dict], params: dict, locations: dict) -> None:
    """Every loaded tensor's bytes against the digest its writer recorded; the first mismatch is named."""
    for name, param in params.items():
        if "xxh3_64" not in records[name]:
            raise ShardstateError(f"the manifest has no checksum for tensor '{name}'", locations[name].file,
                                  "convert again with this shardstate to get checksums")
        actual = tensor_digest(memoryview(param.data.detach().cpu().reshape(-1).view(torch.uint8).numpy()))
        if actual != records[name].get("xxh3_64"):
            raise ShardstateError(
                f"tensor '{name}' does not match its checksum", locations[name].file,
                "the file is damaged: re-create it (`shardstate verify DIR` lists every bad file)",
            )
