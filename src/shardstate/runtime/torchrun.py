"""`shardstate generate` when started by torchrun: this process is one rank."""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from shardstate.errors import ShardstateError
from shardstate.io.arena import Reservation
from shardstate.loaders import LoadReport, memory_to_reserve, resolve_load_format
from shardstate.models import check_parameters_fit
from shardstate.parallel.distributed import init_group, torchrun_env
from shardstate.parallel.layers import parameter_bytes
from shardstate.runtime.prompts import Output, prepare_prompts
from shardstate.runtime.worker import Worker, WorkerArgs, describe, is_collective_timeout
from shardstate.store import cache_files


def generate_under_torchrun(args: argparse.Namespace) -> tuple[list[Output], list[LoadReport]] | None:
    """Load and generate as this rank; rank 0 gets the outputs and every rank's load report, others None."""
    rank, world, local_rank = torchrun_env()
    pp = args.pp
    tp = world // pp if args.tp == 1 else args.tp  # --tp left at its default means "the world size over --pp"
    if tp * pp != world:
        wanted = f"--tp {tp}" + (f" x --pp {pp}" if pp > 1 else "")
        raise ShardstateError(f"{wanted} but torchrun started {world} processes", None,
                              f"pass --tp {world // pp if world % pp == 0 else world} or omit it"
                              + (" (and a --pp that divides the processes)" if world % pp else ""))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's ranks on this host
    prepared = prepare_prompts(args.model, args.dtype, args.prompts, args.max_new_tokens, tp, ranks_here,
                               args.cache_dir)
    config, codec, prompt_ids = prepared.model.config, prepared.codec, prepared.ids
    stages = prepared.model.stages(tp, pp)
    check_parameters_fit(prepared.model.build_on_meta(stages[0]), ranks_here)  # before reserving memory for it
    load_format = resolve_load_format(args.load_format, prepared.model.directory)
    reserve = memory_to_reserve(prepared.model.directory, load_format, rank, args.io, (tp, pp),
                                parameter_bytes(prepared.model.build_on_meta(stages[rank // tp])), False)
    memory = Reservation(reserve) if reserve else None  # faulted in as the rank joins its group, builds its model
    prepared.model.directory.connect()  # an s3:// model's client made while the group forms
    try:
        # the rendezvous times out like a collective
        group = init_group(rank, world, timeout_s=args.timeout, pp_size=pp, partition=stages[0].partition)
        args_for_worker = WorkerArgs(prepared.model, args.load_format, args.io, args.io_threads, args.verify,
                                     pp_size=pp, partition=stages[0].partition)
        with cache_files.settled():  # a rank goes on once what it fetched from S3 is in the node cache
            worker = Worker(args_for_worker, group, local_rank, args.timeout, memory)
            eos = () if args.ignore_eos else config.eos_token_ids
            generation = worker.generate(prompt_ids, args.max_new_tokens, eos, args.logprobs)
        reports = [worker.load_report]
        if world > 1:
            reports = [None] * world
            dist.all_gather_object(reports, worker.load_report)
        return (codec.outputs(prompt_ids, generation), reports) if rank == 0 else None
    except RuntimeError as exc:
        if is_collective_timeout(exc):  # a peer hung or died: torchrun stops the others once this rank exits
            raise ShardstateError(describe(exc, rank)[1], None, "check the other ranks' output") from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
