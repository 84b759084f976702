"""`scatter`: a Hugging Face checkpoint's first load with every byte read once across the ranks (the
approach of vLLM PR #3729 and fastsafetensors), not once per rank as `default` reads it.

The parameters are dealt out to the ranks by the bytes of their source tensors (the same deal on every
rank: largest first, each to the rank with the fewest bytes so far). In model order, the rank that owns a
parameter reads its sources whole, cuts every rank's part with the parameter's spec (`ShardSpec.take`,
what `default` does per rank, so the weights are the same bit for bit), and scatters them: each rank
receives its part straight into its parameter. Scatters run asynchronously, IN_FLIGHT at a time, so a
rank reads and cuts its next parameter while the previous ones travel; memory is bounded by that many
parameters' parts (and one parameter's sources)."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import Checkpoint
from shardstate.io.arena import Scratch
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget, open_checked, read_entries
from shardstate.spec import ShardSpec
from shardstate.store.model_dir import ModelDir

IN_FLIGHT = 4  # scatters posted and not yet waited for


def deal(specs: dict[str, ShardSpec], checkpoint: Checkpoint, ranks: int) -> dict[str, int]:
    """Each parameter's owner: largest first, to the rank that has the fewest source bytes so far (ties to
    the lowest rank), so every rank reads about 1/ranks of the checkpoint."""
    size = {name: sum(checkpoint.tensors[s].entry.end - checkpoint.tensors[s].entry.begin for s in spec.sources())
            for name, spec in specs.items()}
    load = [0] * ranks
    owners = {}
    for name in sorted(specs, key=lambda n: (-size[n], n)):
        owner = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += size[name]
    return owners


def load_scatter(target: LoadTarget, directory: ModelDir) -> ReadAccount:
    if target.pp_size > 1:
        raise ShardstateError("--load-format scatter deals the parameters out over all ranks, which at PP>1 hold "
                              "different ones", None, "use --load-format default or sliced with --pp")
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    nccl = ranks > 1 and dist.get_backend() == "nccl"
    device = torch.device(target.io.device) if nccl else torch.device("cpu")  # where collectives run
    with ReadAccount(directory.remote_weights()) as account:
        checkpoint = open_checked(target.specs, directory.path, account)
        owners = deal(target.specs, checkpoint, ranks)
        scratch = Scratch()
        in_flight: deque[tuple[Any, list[torch.Tensor] | None, torch.Tensor, torch.nn.Parameter]] = deque()
        with torch.no_grad():
            for name, spec in target.specs.items():
                param = target.params[name]
                parts = None
                if owners[name] == target.rank:
                    sources = list(spec.sources())
                    tensors = read_entries([checkpoint.tensors[s] for s in sources], account, scratch)
                    whole = dict(zip(sources, tensors, strict=True))
                    parts = [spec.take(rank, whole, param.dtype).to(device) for rank in range(ranks)]
                if ranks == 1:
                    param.copy_(parts[0])
                    continue
                received = param.data if device.type == "cpu" else torch.empty_like(param, device=device)
                work = dist.scatter(received, parts, src=owners[name], async_op=True)
                in_flight.append((work, parts, received, param))  # parts kept alive until sent
                if len(in_flight) > IN_FLIGHT:
                    _finish(*in_flight.popleft())
            while in_flight:
                _finish(*in_flight.popleft())
    return account


def _finish(work: Any, parts: list[torch.Tensor] | None, received: torch.Tensor, param: torch.nn.Parameter) -> None:
    work.wait()
    if received is not param.data:
        param.data = received
