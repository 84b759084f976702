"""A sharded state saved at another layout (TP x PP), loaded as it is: each parameter's boxes at the running
TP size are intersected with the saved ranks' (`spec.reshard_copies`) of the saved stage that holds it,
and only the byte runs of those overlaps are read, from whichever saved rank files hold them, straight
into the parameter (loaders/boxes.py). The result is the tensors a `convert --tp N --pp P` of the state
would hold, without writing it. An s3:// state is read in place, ranged GETs of just those runs: nothing
is cached (a cache of partial files could not be checked against the manifest's whole-file crc32s).

A parameter is found in the saved state by its source tensors, not its name (a tied embedding is
`lm_head.weight` on a stage with the head, `model.embed_tokens.weight` on a first stage without it); one
several saved stages hold (vLLM keeps some families' embedding, norm and head on every stage) is read
from the first of them.

Checks: each saved rank file's header and own record, as the sharded loader checks its own rank's. With
--verify, every saved tensor read whole is checked against its recorded digest; one read only in part has
no digest to check, and is counted in the load report (`unverified_tensors`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shardstate.format.checkpoint import TensorLocation
from shardstate.format.safetensors_writer import tensor_digest
from shardstate.format.sharded_state import ShardedState, index_rank
from shardstate.io.digests import digest_mismatch
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget
from shardstate.loaders.boxes import Plan, read_boxes
from shardstate.spec import Copy, ShardSpec, Transfer, cut, reshard_copies
from shardstate.store.model_dir import ModelDir
from shardstate.store.remote import rank_objects


@dataclass(frozen=True)
class Saved:
    """Where a parameter lies in the saved state: its stage, its name and shape/dtype/spec there."""

    stage: int
    name: str
    param: torch.Tensor  # on the meta device, with `.spec` at the saved TP size


def sources_key(spec: ShardSpec) -> tuple[str, ...]:
    return tuple(sorted(spec.sources()))


def saved_places(saved: list[dict[str, torch.Tensor]]) -> dict[tuple[str, ...], Saved]:
    """Each saved parameter by its source tensors, in the first saved stage that holds it."""
    places: dict[tuple[str, ...], Saved] = {}
    for stage, params in enumerate(saved):
        for name, param in params.items():
            places.setdefault(sources_key(param.spec), Saved(stage, name, param))
    return places


def needs_of_stage(params: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in params.items()}


def load_resharded(target: LoadTarget, directory: ModelDir, state: ShardedState) -> ReadAccount:
    assert target.saved is not None and state.manifest is not None  # open_for_load refused otherwise
    places = saved_places(target.saved)
    found = {name: places[sources_key(spec)] for name, spec in target.specs.items()}
    transfers = {name: reshard_copies(spec, target.rank, found[name].param.spec) for name, spec in target.specs.items()}

    def world(name: str, t: Transfer) -> int:
        return found[name].stage * state.tp_size + t.saved_rank

    ranks = sorted({world(name, t) for name, ts in transfers.items() for t in ts})
    remote = rank_objects(directory.remote, state.manifest, ranks) if directory.remote is not None else None
    with ReadAccount(remote) as account:
        locations = {rank: index_rank(state, rank, needs_of_stage(target.saved[rank // state.tp_size]), account)
                     for rank in ranks}
        plan: Plan = []
        with torch.no_grad():
            for name, param in target.params.items():
                if not target.specs[name].covers_all(target.rank):
                    param.zero_()  # vocab padding
                for t in transfers[name]:
                    copy = Copy(name, t.saved, t.local)
                    plan.append((locations[world(name, t)][found[name].name], copy.dest(param), copy))
        read_boxes(plan, account)
        if remote is not None:  # read from the network, not through the node cache
            account.fetch_report.bytes_fetched = account.bytes_read
        if target.io.verify:
            _check_whole_reads(target, state, found, transfers, locations, account)
    return account


def _check_whole_reads(target: LoadTarget, state: ShardedState, found: dict[str, Saved],
                       transfers: dict[str, list[Transfer]], locations: dict[int, dict[str, TensorLocation]],
                       account: ReadAccount) -> None:
    """Each saved tensor read whole (its boxes add up to all of it) against its recorded digest, rebuilt
    from the parameter's regions it filled; the others are counted as unverified."""
    assert state.manifest is not None
    for name, ts in transfers.items():
        saved = found[name]
        shape = tuple(saved.param.shape)
        by_rank: dict[int, list[Transfer]] = {}
        for t in ts:
            by_rank.setdefault(saved.stage * state.tp_size + t.saved_rank, []).append(t)
        for saved_rank, parts in by_rank.items():
            if sum(math.prod(length for _, length in t.saved) for t in parts) != math.prod(shape):
                account.unverified += 1
                continue
            whole = torch.empty(shape, dtype=target.params[name].dtype)
            for t in parts:
                cut(whole, t.saved).copy_(cut(target.params[name].detach(), t.local))
            location = locations[saved_rank][saved.name]
            recorded = state.manifest.tensors[str(saved_rank)][location.entry.name]["xxh3_64"]
            if tensor_digest(memoryview(whole.reshape(-1).view(torch.uint8).numpy())) != recorded:
                raise digest_mismatch(name, location.file)
