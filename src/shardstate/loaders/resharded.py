"""A sharded state saved at another TP size, loaded as it is: each parameter's boxes at the running TP size
are intersected with the saved ranks' (`spec.reshard_copies`), and only the byte runs of those overlaps
are read, from whichever saved rank files hold them, straight into the parameter (loaders/boxes.py). The
result is the tensors a `convert --tp N` of the state would hold, without writing it. An s3:// state is
read in place, ranged GETs of just those runs: nothing is cached (a cache of partial files could not be
checked against the manifest's whole-file crc32s).

Checks: each saved rank file's header and own record, as the sharded loader checks its own rank's. With
--verify, every saved tensor read whole is checked against its recorded digest; one read only in part has
no digest to check, and is counted in the load report (`unverified_tensors`)."""

from __future__ import annotations

import math

import torch

from shardstate.format.checkpoint import TensorLocation
from shardstate.format.safetensors_writer import tensor_digest
from shardstate.format.sharded_state import ShardedState, index_rank
from shardstate.io.digests import digest_mismatch
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget
from shardstate.loaders.boxes import Plan, read_boxes
from shardstate.spec import Copy, Transfer, cut, reshard_copies
from shardstate.store.model_dir import ModelDir
from shardstate.store.remote import rank_objects


def load_resharded(
    target: LoadTarget, directory: ModelDir, state: ShardedState, needs: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> ReadAccount:
    """`needs`: each tensor's shape and dtype at the saved TP size (target.saved_specs')."""
    assert target.saved_specs is not None and state.manifest is not None  # open_for_load refused otherwise
    transfers = {name: reshard_copies(spec, target.rank, target.saved_specs[name])
                 for name, spec in target.specs.items()}
    ranks = sorted({t.saved_rank for found in transfers.values() for t in found})
    remote = rank_objects(directory.remote, state.manifest, ranks) if directory.remote is not None else None
    with ReadAccount(remote) as account:
        locations = {rank: index_rank(state, rank, needs, account) for rank in ranks}
        plan: Plan = []
        with torch.no_grad():
            for name, param in target.params.items():
                if not target.specs[name].covers_all(target.rank):
                    param.zero_()  # vocab padding
                for t in transfers[name]:
                    copy = Copy(name, t.saved, t.local)
                    plan.append((locations[t.saved_rank][name], copy.dest(param), copy))
        read_boxes(plan, account)
        if remote is not None:  # read from the network, not through the node cache
            account.fetch_report.bytes_fetched = account.bytes_read
        if target.io.verify:
            _check_whole_reads(target, state, transfers, locations, account)
    return account


def _check_whole_reads(target: LoadTarget, state: ShardedState, transfers: dict[str, list[Transfer]],
                       locations: dict[int, dict[str, TensorLocation]], account: ReadAccount) -> None:
    """Each saved tensor read whole (its boxes add up to all of it) against its recorded digest, rebuilt
    from the parameter's regions it filled; the others are counted as unverified."""
    assert state.manifest is not None and target.saved_specs is not None
    for name, found in transfers.items():
        shape = target.saved_specs[name].local_shape()
        by_rank: dict[int, list[Transfer]] = {}
        for t in found:
            by_rank.setdefault(t.saved_rank, []).append(t)
        for saved_rank, parts in by_rank.items():
            if sum(math.prod(length for _, length in t.saved) for t in parts) != math.prod(shape):
                account.unverified += 1
                continue
            saved = torch.empty(shape, dtype=target.params[name].dtype)
            for t in parts:
                cut(saved, t.saved).copy_(cut(target.params[name].detach(), t.local))
            location = locations[saved_rank][name]
            recorded = state.manifest.tensors[str(saved_rank)][location.entry.name]["xxh3_64"]
            if tensor_digest(memoryview(saved.reshape(-1).view(torch.uint8).numpy())) != recorded:
                raise digest_mismatch(name, location.file)
