"""A rank's files of a sharded state (a cache entry, or a state given as `state=`) read into tensors
someone else allocated (vLLM's parameters), checked as a load checks: every expected tensor once, shapes
and dtypes exact, the files' own records against the manifest and, with `verify`, every tensor's digest
while its bytes arrive. The bytes are read file by file (at most one part's size in flight), then copied
into each parameter where it lies (CPU or accelerator)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.format.sharded_state import ShardedState, index_rank
from shardstate.io.engine import Span, read_spans
from shardstate.io.reader import ReadAccount
from shardstate.loaders.sharded import expected_digests
from shardstate.store.remote import RemoteOrigin, load_rank_files

THREADS = 4


@dataclass(frozen=True)
class ReadReport:
    bytes_read: int
    seconds: float
    files: list[str]

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


def needs_of(params: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in params.items()}


def read_rank(state: ShardedState, rank: int, params: dict[str, torch.Tensor], verify: bool,
              remote: RemoteOrigin | None = None) -> ReadReport:
    """Fill `params` (name -> tensor to overwrite) from `rank`'s files of `state`."""
    if state.manifest is None:
        raise ShardstateError("has no shardstate.json", state.root, "give a state written by shardstate")
    start = time.perf_counter()
    with ReadAccount() as account:
        fetched = load_rank_files(remote, state.manifest, rank, account, THREADS) if remote is not None else {}
        locations = index_rank(state, rank, needs_of(params), account)
        by_file: dict[Path, list[str]] = {}
        for name, location in locations.items():
            by_file.setdefault(location.file, []).append(name)
        records = state.manifest.tensors[str(rank)]
        for path, names in sorted(by_file.items()):
            if path in fetched:  # whole, crc32 checked on the way in
                data, base = fetched[path], 0
            else:
                span = Span(path, min(locations[n].entry.begin for n in names),
                            max(locations[n].entry.end for n in names))
                digests = expected_digests(records, {n: locations[n] for n in names}) if verify else None
                (data,) = read_spans([span], "read", account, THREADS, digests)
                base = span.start
            for name in names:
                entry = locations[name].entry
                _copy_into(params[name], data[entry.begin - base : entry.end - base])
        return ReadReport(account.bytes_read + sum(len(d) for d in fetched.values()),
                          time.perf_counter() - start, list(account.files))


def _copy_into(param: torch.Tensor, raw: torch.Tensor) -> None:
    """The bytes `raw` (uint8, CPU) into `param`'s memory, which stays where it is (aliases see it too)."""
    target = param.data
    if target.is_contiguous():
        target.view(-1).view(torch.uint8).copy_(raw)
    else:
        target.copy_(raw.clone().view(target.dtype).view(target.shape))
