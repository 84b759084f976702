"""Process-group setup and the few collectives the parallel layers use."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group (the default process group when size > 1)."""

    rank: int
    size: int
    store: tuple[str, int] | None = None  # (host, port) of the rendezvous store, when size > 1
    run: str = ""  # a name all ranks of this group share, and no earlier group on the same store had

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(pieces, tensor)
        return torch.cat(pieces, dim=-1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cores_per_rank(size: int) -> int:
    """This host's CPU cores shared out between `size` ranks (at least 1)."""
    return max(1, (os.cpu_count() or 1) // size)


def device_for(local_rank: int) -> torch.device:
    """NCCL and one GPU per rank when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_group(rank: int, size: int, init_method: str | None = None, timeout_s: float = 300) -> TPGroup:
    """Join the TP group. `init_method` None means torchrun's env:// (MASTER_ADDR/MASTER_PORT). The
    rendezvous store (a TCPStore, hosted by rank 0 or by torchrun's agent) is made here and handed to
    init_process_group, so that the ranks can also use it themselves (parallel/peers.py)."""
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
        return TPGroup(rank, size, address, run[0])
    return TPGroup(rank, size)


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
