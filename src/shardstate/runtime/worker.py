"""One rank (a TP rank of a pipeline stage): build the stage's model on meta, materialise, load, then
serve commands (spawned) or run once (torchrun)."""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from shardstate.errors import ShardstateError
from shardstate.io.arena import Reservation
from shardstate.io.reader import Arrivals
from shardstate.loaders import IOOptions, load_weights, resolve_load_format
from shardstate.loaders.sharded import rebinds_parameters
from shardstate.models import OpenedModel
from shardstate.parallel.distributed import TPGroup, device_for, init_group, reader_threads
from shardstate.parallel.layers import materialize
from shardstate.parallel.peers import loading
from shardstate.quant.apply import quantize_linear_weights
from shardstate.quant.methods import method_named
from shardstate.runtime.generate import Generation, greedy_generate
from shardstate.runtime.lifeline import watch_driver
from shardstate.store import cache_files
from shardstate.store.writer import StatePlan


@dataclass(frozen=True)
class WorkerArgs:
    model: OpenedModel  # opened once by the driver: config, dtype, a sharded state's parsed manifest
    load_format: str
    io_mode: str = "read"
    io_threads: int | None = None  # None: parallel/distributed.reader_threads
    verify: bool = False
    quantize: str | None = None  # quantize the linear weights after load (quant/): int8 | fp8
    pp_size: int = 1
    partition: tuple[int, ...] | None = None  # layers per stage (a PP state at its own layout: its own)


class Worker:
    def __init__(self, args: WorkerArgs, group: TPGroup, local_rank: int, timeout_s: float,
                 memory: Reservation | None = None):
        self.args = args
        self.config = args.model.config
        self.rank = group.world_rank
        self.group = group
        self.model = args.model.build_on_meta(group)
        directory = args.model.directory
        rebinds = rebinds_parameters(directory, resolve_load_format(args.load_format, directory),
                                     (group.size, group.pp_size))
        materialize(self.model, torch.device("cpu"), None if rebinds else memory)  # (loaders copy into them)
        device = device_for(local_rank)
        threads = args.io_threads or reader_threads(group.world_size)
        io = IOOptions(args.io_mode, threads, str(device), args.verify, memory if rebinds else None)
        if group.world_size > 1:
            dist.barrier()  # ranks start loading together, so per-rank load times are comparable
        with loading(group, Arrivals.so_far, timeout_s):  # a rank still downloading is waited for, not timed out
            prefaulted = memory.faulted if memory is not None else 0
            report = load_weights(args.load_format, self.model, directory, group.rank, io,
                                  args.model.saved_layout(group.size, group.pp_size))
        self.load_report = replace(report, bytes_prefaulted=prefaulted)
        if memory is not None:  # the parameters hold what the load used of it; the rest goes now
            memory.release()
        if args.quantize is not None:
            quantize_linear_weights(self.model, method_named(args.quantize), group)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: tuple[int, ...],
                 logprobs: int | None = None) -> Generation:
        return greedy_generate(self.model, prompts, max_new_tokens, eos_token_ids, logprobs)

    def save(self, directory: str, pattern: str, max_part_bytes: int, config_json: bytes) -> dict:
        """Write this rank's live parameters (each distinct tensor once) as its part files; return what the
        manifest needs (RankWriter.result())."""
        model = self.args.model
        plan = StatePlan.make(dict(self.model.named_parameters()), model.dtype, self.config.num_hidden_layers,
                              max_part_bytes, config_json, pattern, model.quantization or self.args.quantize,
                              self.group.stage_layers(self.config.num_hidden_layers), self.group.pp_size)
        writer = plan.writer(Path(directory), self.rank)
        try:
            for name, param in self.model.named_parameters():
                writer.write(name, param.detach().cpu())
            plan.finish(writer)
        finally:
            writer.abort()
        return writer.result()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.model.named_parameters()}


def is_collective_timeout(exc: BaseException) -> bool:
    """gloo/NCCL ("Timed out waiting 3000ms ...") and the rendezvous store ("wait timeout after 3000ms")
    give up on a peer with a RuntimeError that says so."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe(exc: BaseException, rank: int) -> tuple[str, str]:
    """(status, one line) for the driver: a collective that timed out waiting for peers ('timeout', so the
    driver can name the ranks that did not answer); bad input as it is; anything else as an internal
    error on this rank."""
    if is_collective_timeout(exc):
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0])[:160]  # drop gloo's "[file:line]"
        return "timeout", f"rank {rank} timed out waiting for its peers ({detail})"
    if isinstance(exc, ShardstateError):
        return "error", str(exc)
    if os.environ.get("SHARDSTATE_DEBUG"):
        traceback.print_exc()
    return "error", (f"internal error on rank {rank}: {type(exc).__name__}: {exc} "
                     "(SHARDSTATE_DEBUG=1 shows the traceback)")


def worker_main(
    conn: Connection, driver: Connection, rank: int, size: int, init_method: str, threads: int, timeout_s: float,
    memory: Reservation | None = None,
) -> None:
    """A spawned worker (started by runtime/worker_start.py): receive its WorkerArgs, reply ('ok',
    LoadReport) after loading into `memory` (reserved for it, if any), then serve commands. A collective
    waits at most `timeout_s` for a peer before this rank gives up and reports it. The worker ends when
    its `driver` lifeline closes; a terminal's Ctrl-C is for the driver to act on."""
    watch_driver(driver)
    torch.set_num_threads(threads)
    try:
        args: WorkerArgs = conn.recv()
        args.model.directory.connect()  # an s3:// model's client made while the group forms
        group = init_group(rank, size, init_method, timeout_s, args.pp_size, args.partition)
        worker = Worker(args, group, rank, timeout_s, memory)
        conn.send(("ok", worker.load_report))
        while True:
            command, kwargs = conn.recv()
            if command == "close":  # once this rank's files fetched from S3 are in the node cache
                cache_files.finish()
                conn.send(("ok", None))
                break
            conn.send(("ok", getattr(worker, command)(**kwargs)))
    except EOFError:
        pass  # the driver went away
    except Exception as exc:
        conn.send(describe(exc, rank))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


