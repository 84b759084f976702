"""LLM: start worker processes for a model (TP x PP ranks), load it, generate greedily, report each rank's
load."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NoReturn

import torch

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import find_weight_files
from shardstate.format.manifest import PP1_PATTERN, PP_PATTERN, check_pattern
from shardstate.io.engine import IO_MODES
from shardstate.io.reader import ReadAccount
from shardstate.loaders import LoadReport, memory_to_reserve, resolve_load_format
from shardstate.loaders.sharded import check_before_workers
from shardstate.models import (
    OpenedModel,
    build_on_meta,
    check_generation_fits,
    check_parameters_fit,
    open_model,
    quantize_after_load,
)
from shardstate.parallel.distributed import cores_per_rank, free_port
from shardstate.parallel.layers import parameter_bytes
from shardstate.runtime.lifeline import lifeline, starting_worker
from shardstate.runtime.prompts import Output, PromptCodec
from shardstate.runtime.worker import WorkerArgs
from shardstate.runtime.worker_start import start_worker
from shardstate.stops import forget, on_default_death
from shardstate.store.output import staged_output
from shardstate.store.remote import remove_temporaries_of
from shardstate.store.writer import StatePlan, complete_state, source_records

# Bounds on what a caller may ask for (the CLI's argument types use the same): a time-out from 1 s (starting
# gloo and the rendezvous takes about that) to a day, at most 64 reader threads per rank, and on CPU at
# most 4 ranks per core (beyond that the ranks only thrash).
TIMEOUT_RANGE_S = (1, 86400)
IO_THREADS_RANGE = (1, 64)
RANKS_PER_CPU_CORE = 4


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_options(tp_size: int, io: str, io_threads: int | None, timeout: float, pp_size: int = 1) -> None:
    """Refuse options no run can use, each with one line, before anything starts."""
    if not _is_int(tp_size):
        raise ShardstateError(f"TP size {tp_size!r} is not an integer", None, "use --tp 1 or more")
    if not (_is_int(pp_size) and pp_size >= 1):
        raise ShardstateError(f"PP size {pp_size!r} is not a positive integer", None, "use --pp 1 or more")
    ranks = tp_size * pp_size
    what, option = (f"TP size {tp_size}", "--tp") if pp_size == 1 else (f"TP x PP = {ranks} ranks", "TP x PP")
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if ranks > gpus:
            raise ShardstateError(f"{what} needs {ranks} GPUs, this host has {gpus}", None,
                                  f"use {option} {gpus} or less, or torchrun over several hosts")
    elif ranks > RANKS_PER_CPU_CORE * (os.cpu_count() or 1):
        cores = os.cpu_count() or 1
        raise ShardstateError(f"{what} is more than {RANKS_PER_CPU_CORE} ranks per CPU core on this "
                              f"host ({cores} cores)", None, f"use {option} {RANKS_PER_CPU_CORE * cores} or less")
    if io not in IO_MODES:
        raise ShardstateError(f"unknown I/O mode '{io}'", None, f"use one of {', '.join(IO_MODES)}")
    low, high = IO_THREADS_RANGE
    if io_threads is not None and not (_is_int(io_threads) and low <= io_threads <= high):
        raise ShardstateError(f"io_threads={io_threads!r} is not an integer from {low} to {high}", None,
                              "pass e.g. 4, or None for the default")
    low, high = TIMEOUT_RANGE_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not low <= timeout <= high:
        raise ShardstateError(f"timeout {timeout} is not a positive number of seconds from {low} to {high}", None,
                              "pass e.g. 120")


class LLM:
    """`LLM(model_dir, tensor_parallel_size=2, load_format="sliced", io="read")` spawns one process per rank
    (gloo on CPU, NCCL with CUDA), loads the weights there and keeps the workers until `close()`. With
    `pipeline_parallel_size` = P, P stages of `tensor_parallel_size` ranks each, each stage its layers.

    `timeout` bounds how long a hung rank can stall the others: a collective gives up after waiting that
    long for a peer, and once one rank has answered a call the rest have that long to answer too.
    Either way every worker is killed and the error names the ranks that did not answer.

    `model` is a directory, or a model already opened with `shardstate.models.open_model` (which has its
    dtype: `dtype` must then be None)."""

    def __init__(
        self,
        model: str | os.PathLike[str] | OpenedModel,
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
        dtype: str | None = None,
        io: str = "read",
        io_threads: int | None = None,
        verify: bool = False,
        timeout: float = 120.0,
        quantize: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        pipeline_parallel_size: int = 1,
    ) -> None:
        check_run_options(tensor_parallel_size, io, io_threads, timeout, pipeline_parallel_size)
        world = tensor_parallel_size * pipeline_parallel_size
        if isinstance(model, OpenedModel) and dtype is not None:
            raise ShardstateError("dtype given for a model already opened", None, "pass it to open_model instead")
        opened = model if isinstance(model, OpenedModel) else open_model(model, dtype, cache_dir)
        self._opened = opened
        self.quantize = quantize_after_load(opened, quantize)
        self.quantization = opened.quantization or self.quantize  # what the live weights are
        self.model_dir = opened.directory.path  # absolute: the workers' working directory is fixed when they start
        self.config = opened.config
        self.tp_size = tensor_parallel_size
        self.pp_size = pipeline_parallel_size
        self.world_size = world
        self.prompts = PromptCodec(self.model_dir, self.config)
        self._model_dtype = opened.dtype
        self.timeout = timeout
        with opened.directory.errors_named():  # refuse a bad model or state before any worker starts
            self.config.check_tp_size(tensor_parallel_size)
            load_format = resolve_load_format(load_format, opened.directory)
            self._stages = opened.stages(tensor_parallel_size, pipeline_parallel_size)
            meta_models = [opened.build_on_meta(group) for group in self._stages]
            check_parameters_fit(meta_models[0], ranks_here=world)
            if load_format == "sharded":
                check_before_workers(opened.directory, [dict(m.named_parameters()) for m in meta_models],
                                     self._model_dtype, verify, opened.saved_layout(tensor_parallel_size,
                                                                                    pipeline_parallel_size))
        if self.quantize is not None:
            meta_models = [build_on_meta(self.config, group, self._model_dtype, self.quantization)
                           for group in self._stages]
        # what `save` writes: each stage's parameters (the same names on every rank of a stage)
        self._live_params = [dict(m.named_parameters()) for m in meta_models]
        args = WorkerArgs(opened, load_format, io, io_threads, verify, self.quantize, pipeline_parallel_size,
                          self._stages[0].partition)
        layout = (tensor_parallel_size, pipeline_parallel_size)  # each worker's load memory, faulted in as it starts
        reserve = [memory_to_reserve(opened.directory, load_format, rank, io, layout,
                                     parameter_bytes(meta_models[rank // tensor_parallel_size]),
                                     self.quantize is not None) for rank in range(world)]
        context = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = cores_per_rank(world)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._lifelines: list[Connection] = []  # the workers exit when these close (runtime/lifeline.py)
        me = weakref.ref(self)
        on_default_death(self, lambda: (llm := me()) is not None and llm.close(graceful=False))
        try:
            for rank in range(world):
                parent, child = context.Pipe()
                worker_end, driver_end = lifeline(context)
                proc = context.Process(
                    target=start_worker,
                    args=(child, worker_end, rank, world, init_method, threads, timeout, reserve[rank]),
                    daemon=True,
                )
                with starting_worker():  # inherited: a Ctrl-C while the worker starts up is for the driver
                    proc.start()
                child.close()
                worker_end.close()
                self._conns.append(parent)
                self._procs.append(proc)
                self._lifelines.append(driver_end)
            # Sent once every worker runs, not as Process args: spawn writes those into a pipe whose read end
            # it keeps open itself, so a worker dying at start-up would block that write for ever once they
            # pass the pipe's 64 KiB (a manifest does); a dead worker here breaks the pipe, _collect names it.
            for conn in self._conns:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.send(args)
            self.load_reports: list[LoadReport] = self._collect()
        except BaseException:
            self.close(graceful=False)
            raise

    # -- talking to workers -------------------------------------------------------------------------
    def _collect(self) -> list[Any]:
        """One reply per rank. The first error, dead worker or rank still silent `timeout` seconds after
        another answered stops every worker and is raised."""
        replies: dict[int, Any] = {}
        deadline = None
        while len(replies) < self.world_size:
            waiting = {c: r for r, c in enumerate(self._conns) if r not in replies}
            sentinels = {self._procs[r].sentinel: r for r in waiting.values()}
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready_list = wait([*waiting, *sentinels], timeout=left)
            if not ready_list:
                silent = sorted(waiting.values())
                self._fail(f"rank(s) {', '.join(map(str, silent))} did not answer within {self.timeout:g} s of "
                           f"rank {min(replies)}", silent)
            for ready in ready_list:
                if ready in waiting:
                    try:
                        status, payload = ready.recv()
                    except (EOFError, OSError):
                        status, payload = "error", None
                    rank = waiting[ready]
                else:
                    rank, status, payload = sentinels[ready], "error", None
                if status == "timeout":
                    silent = sorted(r for r in waiting.values() if r != rank)
                    self._fail(f"{payload}; no answer from rank(s) {', '.join(map(str, silent))}", silent)
                if status != "ok":
                    if payload is None:
                        self._procs[rank].join(timeout=5)
                        payload = f"worker rank {rank} died (exit code {self._procs[rank].exitcode})"
                    self._fail(payload, [])
                replies[rank] = payload
                deadline = deadline or time.monotonic() + self.timeout
        return [replies[r] for r in range(self.world_size)]

    def _fail(self, what: str, silent: list[int]) -> NoReturn:
        """Kill every worker (peers may be blocked in a collective with the failed rank) and raise."""
        self.close(graceful=False)
        if silent:
            raise ShardstateError(what, None, f"a rank is hung or stopped; if ranks are only slow, raise the "
                                              f"timeout (now {self.timeout:g} s)")
        raise ShardstateError(what)

    def _call(self, command: str, **kwargs: Any) -> list[Any]:
        """Every rank runs `command`; their replies in rank order. Interrupted half-way (Ctrl-C, a stop
        signal), the workers are left mid-command: they are killed, and this LLM is closed."""
        if not self._conns:
            raise ShardstateError("this LLM is closed", None, "create a new LLM")
        try:
            for conn in self._conns:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.send((command, kwargs))  # a dead worker is reported by _collect, by its rank
            return self._collect()
        except BaseException:
            self.close(graceful=False)
            raise

    # -- public API ---------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 16,
        ignore_eos: bool = False,
        logprobs: int | None = None,
    ) -> list[Output]:
        """Greedy continuation of each prompt (text, or token ids), as one batch. `logprobs` = k: each
        output also has, per new token, its step's k most likely tokens and their log-probabilities."""
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ShardstateError(f"max_new_tokens={max_new_tokens!r} is not 0 or a positive integer", None,
                                  "pass 0 or more")
        if logprobs is not None and not (_is_int(logprobs) and logprobs >= 1):
            raise ShardstateError(f"logprobs={logprobs!r} is not a positive integer", None,
                                  "pass e.g. 5, or None for none")
        if not prompts:
            return []
        ids = self.prompts.encode(prompts)
        check_generation_fits(self.config, ids, max_new_tokens, self.tp_size, self._model_dtype,
                              ranks_here=self.world_size)
        eos = () if ignore_eos else self.config.eos_token_ids
        generation = self._call("generate", prompts=ids, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                                logprobs=logprobs)[0]
        return self.prompts.outputs(ids, generation)

    def save_sharded_state(
        self, path: str | os.PathLike[str], pattern: str | None = None, max_size: int = 5 << 30, force: bool = False,
        for_vllm: bool = False,
    ) -> list[str]:
        """Each worker writes its own live parameters to `path` (vLLM's file pattern by default, parts
        rolling over at `max_size` bytes); the manifest goes last and the directory appears atomically.
        `for_vllm`: a quantized state also gets what vLLM's loader needs (quant/vllm.py). Returns the file
        names written."""
        pattern = check_pattern(pattern or (PP1_PATTERN if self.pp_size == 1 else PP_PATTERN), self.pp_size)
        out = Path(path)
        config_json = self._opened.state_config_json(self.quantization, for_vllm)
        with staged_output(out, self.model_dir, force) as tmp:
            written = self._call("save", directory=str(tmp), pattern=pattern, max_part_bytes=max_size,
                                 config_json=config_json)
            layers = self.config.num_hidden_layers
            plans = [StatePlan.make(params, self._model_dtype, layers, max_size, config_json, pattern,
                                    self.quantization, group.stage_layers(layers), self.pp_size)
                     for params, group in zip(self._live_params, self._stages, strict=True)]
            with ReadAccount(self._opened.directory.remote_weights()) as account:
                sizes = account.sizes(find_weight_files(self.model_dir, account.remote))
            source = source_records(self._opened.directory.state, sizes)
            manifest = complete_state(tmp, self.model_dir, self.config, plans, written, source)
        return sorted(manifest.files)

    def rank_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's parameters by vLLM name (copies), for checks across load paths."""
        return self._call("state_dict")

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: ask them to leave (graceful) or kill them at once; either way every worker is
        reaped before this returns. Leaving, a worker first finishes writing what it fetched from S3 into
        the node cache (store/cache_files.py): a graceful close returns with those files whole and in place.
        Stopped meanwhile (a signal, Ctrl-C), the workers are killed and their temporaries removed."""
        if graceful and self._conns:
            try:
                self._call("close")  # on any failure, _call has closed this LLM the hard way
            except ShardstateError as exc:
                print(f"warning: closing: {exc}", file=sys.stderr)
        for proc in self._procs:
            proc.join(timeout=10 if graceful else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=30)
            if proc.is_alive():  # uninterruptible (a hung device or file system): nothing more to do here
                print(f"warning: worker pid {proc.pid} did not exit after SIGKILL", file=sys.stderr)
            elif self._opened.directory.remote is not None:  # a worker killed mid-download left its temporary
                remove_temporaries_of(self._opened.directory.remote.cache, proc.pid)
        for conn in (*self._conns, *self._lifelines):
            conn.close()
        self._conns, self._procs, self._lifelines = [], [], []
        forget(self)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(graceful=exc_type is None)

    def __del__(self) -> None:
        if getattr(self, "_procs", None):
            self.close()
