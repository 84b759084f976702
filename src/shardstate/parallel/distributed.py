"""Process-group setup and the few collectives the parallel layers use."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from shardstate.parallel.pipeline import stage_layers


@dataclass(frozen=True)
class TPGroup:
    """This process's place: TP rank `rank` of `size` in pipeline stage `pp_rank` of `pp_size`. The world
    is pp_size * size processes, world rank = pp_rank * size + rank (vLLM's order: a stage's TP ranks are
    consecutive). At PP=1 the TP group is the default process group; at PP>1 `handle` is the stage's."""

    rank: int
    size: int
    store: tuple[str, int] | None = None  # (host, port) of the rendezvous store, when the world is > 1
    run: str = ""  # a name all ranks of this group share, and no earlier group on the same store had
    pp_rank: int = 0
    pp_size: int = 1
    handle: Any = field(default=None, compare=False, repr=False)  # the stage's TP process group (PP>1)
    partition: tuple[int, ...] | None = None  # layers per stage; None: as vLLM splits them (parallel/pipeline.py)

    def stage_layers(self, num_layers: int) -> range:
        """The global indices of the layers this rank's stage holds."""
        return stage_layers(num_layers, self.pp_rank, self.pp_size, self.partition)

    @property
    def world_rank(self) -> int:
        return self.pp_rank * self.size + self.rank

    @property
    def world_size(self) -> int:
        return self.pp_size * self.size

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, group=self.handle)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.handle)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(pieces, tensor, group=self.handle)
        return torch.cat(pieces, dim=-1)

    def send_to_next_stage(self, tensor: torch.Tensor) -> None:
        """Point-to-point to the same TP rank of the next stage (hidden states between stages)."""
        dist.send(tensor.contiguous(), dst=self.world_rank + self.size)

    def receive_from_previous_stage(self, like: torch.Tensor) -> torch.Tensor:
        """What the same TP rank of the previous stage sent: a tensor shaped and typed as `like`."""
        received = torch.empty_like(like)
        dist.recv(received, src=self.world_rank - self.size)
        return received

    def from_last_stage(self, tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The last stage's `tensor` (its TP rank 0's), on every rank of the world (`like` elsewhere gives its
        shape and dtype): every rank then takes the same greedy step."""
        buffer = tensor.contiguous() if tensor is not None and self.rank == 0 else torch.empty_like(like)
        dist.broadcast(buffer, src=(self.pp_size - 1) * self.size)
        return buffer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cores_per_rank(size: int) -> int:
    """The CPU cores this process may run on (its affinity: what taskset, a cgroup cpuset or an engine's
    core binding leave it, not the host's count) shared out between `size` ranks (at least 1)."""
    return max(1, len(os.sched_getaffinity(0)) // size)


# Reader threads per rank unless asked: the rank's share of the cores, but at least 2 (one thread's page
# faults overlap the other's copy: on 2 cores, 2 threads were faster at TP=1 and never slower beyond
# noise at TP=2 and 4, even with 4 ranks; bench/results.md) and at most 8 (a large host does not
# start dozens of reader threads per rank).
MIN_IO_THREADS, MAX_IO_THREADS = 2, 8


def reader_threads(size: int) -> int:
    """How many threads read a rank's files when `size` ranks share this process's cores."""
    return min(MAX_IO_THREADS, max(MIN_IO_THREADS, cores_per_rank(size)))


def device_for(local_rank: int) -> torch.device:
    """NCCL and one GPU per rank when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_group(rank: int, size: int, init_method: str | None = None, timeout_s: float = 300,
               pp_size: int = 1, partition: tuple[int, ...] | None = None) -> TPGroup:
    """Join the world of `size` ranks as world rank `rank`: TP size size // pp_size, each stage's TP ranks
    consecutive. `init_method` None means torchrun's env:// (MASTER_ADDR/MASTER_PORT). The
    rendezvous store (a TCPStore, hosted by rank 0 or by torchrun's agent) is made here and handed to
    init_process_group, so that the ranks can also use it themselves (parallel/peers.py)."""
    tp_size = size // pp_size
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device_for(int(os.environ.get("LOCAL_RANK", rank))))
        address = store_address(init_method)
        # torchrun's agent hosts the store itself (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does
        host_here = rank == 0 and not (init_method is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(address[0], address[1], size, is_master=host_here, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
        run = [secrets.token_hex(8)]
        dist.broadcast_object_list(run, src=0)  # torchrun's agent keeps its store across restarts
        handle = None
        if pp_size > 1:  # every rank makes every stage's group, in the same order (new_group's rule)
            for stage in range(pp_size):
                made = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
                handle = made if stage == rank // tp_size else handle
        return TPGroup(rank % tp_size, tp_size, address, run[0], rank // tp_size, pp_size, handle, partition)
    return TPGroup(rank % tp_size, tp_size, pp_rank=rank // tp_size, pp_size=pp_size, partition=partition)


def store_address(init_method: str | None) -> tuple[str, int]:
    """(host, port) of the rendezvous store: `tcp://host:port`, or torchrun's MASTER_ADDR/MASTER_PORT."""
    if init_method is None:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    return None
