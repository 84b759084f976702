"""LLM: start TP worker processes for a model, load it, generate greedily, report each rank's load."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, NoReturn

import torch

from shardstate.config import load_config
from shardstate.dtypes import resolve_dtype
from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import find_weight_files
from shardstate.format.manifest import PP1_PATTERN
from shardstate.io.engine import IO_MODES
from shardstate.loaders import LoadReport, resolve_load_format
from shardstate.models import build_on_meta
from shardstate.runtime.distributed import TPGroup, cores_per_rank, free_port
from shardstate.runtime.prompts import Output, PromptCodec
from shardstate.runtime.worker import WorkerArgs, worker_main
from shardstate.state_writer import StatePlan, check_pattern, complete_state, staged_output


class LLM:
    """`LLM(model_dir, tensor_parallel_size=2, load_format="sliced", io="read")` spawns one process per rank
    (gloo on CPU, NCCL with CUDA), loads the weights there and keeps the workers until `close()`.

    `timeout` bounds how long a hung rank can stall the others: a collective gives up after waiting that
    long for a peer, and once one rank has answered a call the rest have that long to answer too.
    Either way every worker is killed and the error names the ranks that did not answer."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
        dtype: str | None = None,
        io: str = "read",
        io_threads: int | None = None,
        verify: bool = False,
        timeout: float = 120.0,
    ):
        self.model_dir = Path(model)
        self.config = load_config(self.model_dir)
        self.config.check_tp_size(tensor_parallel_size)
        resolve_load_format(load_format, self.model_dir)
        self.tp_size = tensor_parallel_size
        self._dtype = dtype
        self.prompts = PromptCodec(self.model_dir, self.config)
        if io not in IO_MODES:
            raise ShardstateError(f"unknown I/O mode '{io}'", None, f"use one of {', '.join(IO_MODES)}")
        if not timeout > 0:
            raise ShardstateError(f"timeout {timeout} is not a positive number of seconds", None, "pass e.g. 120")
        self.timeout = timeout
        args = WorkerArgs(str(self.model_dir), load_format, dtype, io, io_threads, verify)
        context = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = cores_per_rank(tensor_parallel_size)
        self._conns = []
        self._procs = []
        for rank in range(tensor_parallel_size):
            parent, child = context.Pipe()
            proc = context.Process(
                target=worker_main,
                args=(child, rank, tensor_parallel_size, init_method, args, threads, timeout),
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self.load_reports: list[LoadReport] = self._collect()

    # -- talking to workers -------------------------------------------------------------------------
    def _collect(self) -> list[Any]:
        """One reply per rank. The first error, dead worker or rank still silent `timeout` seconds after
        another answered stops every worker and is raised."""
        replies: dict[int, Any] = {}
        deadline = None
        while len(replies) < self.tp_size:
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
        return [replies[r] for r in range(self.tp_size)]

    def _fail(self, what: str, silent: list[int]) -> NoReturn:
        """Kill every worker (peers may be blocked in a collective with the failed rank) and raise."""
        self.close(graceful=False)
        if silent:
            raise ShardstateError(what, None, f"a rank is hung or stopped; if ranks are only slow, raise the "
                                              f"timeout (now {self.timeout:g} s)")
        raise ShardstateError(what)

    def _call(self, command: str, **kwargs: Any) -> list[Any]:
        if not self._conns:
            raise ShardstateError("this LLM is closed", None, "create a new LLM")
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send((command, kwargs))  # a dead worker is reported by _collect, by its rank
        return self._collect()

    # -- public API ---------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 16,
        ignore_eos: bool = False,
    ) -> list[Output]:
        """Greedy continuation of each prompt (text, or token ids), as one batch."""
        if max_new_tokens < 0:
            raise ShardstateError(f"max_new_tokens={max_new_tokens} is negative", None, "pass 0 or more")
        if not prompts:
            return []
        ids = self.prompts.encode(prompts)
        eos = () if ignore_eos else self.config.eos_token_ids
        generation = self._call("generate", prompts=ids, max_new_tokens=max_new_tokens, eos_token_ids=eos)[0]
        return self.prompts.outputs(ids, generation)

    def save_sharded_state(
        self, path: str | os.PathLike[str], pattern: str | None = None, max_size: int = 5 << 30, force: bool = False
    ) -> list[str]:
        """Each worker writes its own live parameters to `path` (vLLM's file pattern by default, parts
        rolling over at `max_size` bytes); the manifest goes last and the directory appears atomically.
        Returns the file names written."""
        pattern = check_pattern(pattern or PP1_PATTERN)
        out = Path(path)
        with staged_output(out, force) as tmp:
            written = self._call("save", directory=str(tmp), pattern=pattern, max_part_bytes=max_size)
            dtype = resolve_dtype(self._dtype, self.config, self.model_dir)
            specs = build_on_meta(self.config, TPGroup(0, self.tp_size), dtype).shard_specs()
            plan = StatePlan.make(specs, dtype, self.config.num_hidden_layers, max_size, pattern)
            sources = find_weight_files(self.model_dir)
            manifest = complete_state(tmp, self.model_dir, self.config, plan, written, sources)
        return sorted(manifest.files)

    def rank_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's parameters by vLLM name (copies), for checks across load paths."""
        return self._call("state_dict")

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: ask them to leave (graceful) or kill them at once."""
        for conn in self._conns if graceful else ():
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("close", {}))
        for proc in self._procs:
            proc.join(timeout=10 if graceful else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_procs", None):
            self.close()
