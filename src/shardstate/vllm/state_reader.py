"""A rank's files of a sharded state (a cache entry, or a state given as `state=`) read into tensors
someone else allocated (vLLM's parameters), checked as a load checks: every expected tensor once, shapes
and dtypes exact, the files' own records against the manifest and, with `verify`, every tensor's digest
while its bytes arrive. A contiguous CPU parameter is read into straight from the file (one copy, several
threads, each tensor's digest taken block by block right after its bytes land); anything else (an
accelerator's memory) through the engine, one file at a time, then copied where it lies."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import TensorLocation
from shardstate.format.sharded_state import ShardedState, index_rank
from shardstate.io.arena import populate_memory
from shardstate.io.digests import digest_mismatch
from shardstate.io.engine import Span, read_spans
from shardstate.io.reader import Arrivals, ReadAccount, byte_view
from shardstate.loaders.sharded import expected_digests, needs_of
from shardstate.parallel.distributed import reader_threads
from shardstate.store.remote import RemoteOrigin, load_rank_files

BLOCK = 8 << 20


@dataclass(frozen=True)
class ReadReport:
    bytes_read: int  # from files (local, the node cache) and objects, headers included
    seconds: float
    files: list[str]
    bytes_fetched: int = 0  # of those, from object storage

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


def read_rank(state: ShardedState, rank: int, params: dict[str, torch.Tensor], verify: bool,
              remote: RemoteOrigin | None = None) -> ReadReport:
    """Fill `params` (name -> tensor to overwrite) from `rank`'s files of `state`."""
    if state.manifest is None:
        raise ShardstateError("has no shardstate.json", state.root, "give a state written by shardstate")
    start = time.perf_counter()
    with ReadAccount() as account:
        threads = reader_threads(1)  # this process's cores (vLLM binds each CPU rank to its own)
        fetched = load_rank_files(remote, state.manifest, rank, account, threads) if remote is not None else {}
        locations = index_rank(state, rank, needs_of(params), account)
        by_file: dict[Path, list[str]] = {}
        for name, location in locations.items():
            by_file.setdefault(location.file, []).append(name)
        records = state.manifest.tensors[str(rank)]
        direct = {n for n, p in params.items() if p.device.type == "cpu" and p.data.is_contiguous()}
        for path, names in sorted(by_file.items()):
            if path in fetched:  # whole in memory, its crc32 checked on the way in
                _copy_all(names, locations, params, fetched[path], 0)
                continue
            read_into_parameters(account, path, [n for n in names if n in direct], locations, params,
                                 records if verify else None)
            staged = [n for n in names if n not in direct]
            if staged:
                span = Span(path, min(locations[n].entry.begin for n in staged),
                            max(locations[n].entry.end for n in staged))
                digests = expected_digests(records, {n: locations[n] for n in staged}) if verify else None
                (data,) = read_spans([span], "read", account, threads, digests)
                _copy_all(staged, locations, params, data, span.start)
        return ReadReport(account.bytes_read, time.perf_counter() - start, list(account.files),
                          account.fetch_report.bytes_fetched)


def read_into_parameters(account: ReadAccount, path: Path, names: list[str], locations: dict[str, TensorLocation],
                         params: dict[str, torch.Tensor], records: dict[str, dict] | None) -> None:
    """Each named tensor of `path` read straight into its parameter's memory (contiguous, CPU), BLOCK bytes
    at a time, its digest (with `records`) following each block while it is in cache."""
    reader = account.reader(path)

    def read(name: str) -> int:
        entry = locations[name].entry
        dest, address = byte_view(params[name].data), params[name].data_ptr()
        hasher = xxhash.xxh3_64()
        for lo in range(0, len(dest), BLOCK):
            block = dest[lo : lo + BLOCK]
            populate_memory(address + lo, len(block))
            if reader.read_into(entry.begin + lo, block) < len(block):
                raise ShardstateError(f"file ends before byte {entry.begin + lo + len(block)}", path,
                                      "the file is truncated: re-create it")
            if records is not None:
                hasher.update(block)
        if records is not None and hasher.hexdigest() != records[entry.name]["xxh3_64"]:
            raise digest_mismatch(name, path)
        return len(dest)

    with ThreadPoolExecutor(reader_threads(1)) as pool:
        done = sum(pool.map(read, names))
    Arrivals.add(done)
    account.bytes_read += done


def _copy_all(names: list[str], locations: dict[str, TensorLocation], params: dict[str, torch.Tensor],
              data: torch.Tensor, base: int) -> None:
    """Each named tensor from `data` (bytes of its file from offset `base`) into its parameter."""
    for name in names:
        entry = locations[name].entry
        _copy_into(params[name], data[entry.begin - base : entry.end - base])


def _copy_into(param: torch.Tensor, raw: torch.Tensor) -> None:
    """The bytes `raw` (uint8, CPU) into `param`'s memory, which stays where it is (aliases see it too)."""
    target = param.data
    if target.is_contiguous():
        target.view(-1).view(torch.uint8).copy_(raw)
    else:
        target.copy_(raw.clone().view(target.dtype).view(target.shape))
