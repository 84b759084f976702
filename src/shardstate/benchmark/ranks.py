"""Loads that run in one spawned process per rank, started together at a barrier and timed from it:
the hardware limits (plain readinto of the rank's bytes into pre-faulted memory; the disk's own rate with
O_DIRECT) and the safetensors peer (load_file, then copy into the model's parameters)."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from shardstate.memory import peak_rss_bytes
from shardstate.runtime.lifeline import lifeline, starting_worker, watch_driver


def limit_read(rank: int, tp_size: int, files: list[str], barrier: Any) -> dict:
    import torch

    total = sum(Path(f).stat().st_size for f in files)
    memory = torch.empty(total, dtype=torch.uint8)
    memory.zero_()  # pre-fault, untimed
    view = memoryview(memory.numpy())
    barrier.wait()
    start = time.perf_counter()
    done = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view[done:]):
                done += n
    return {"rank": rank, "seconds": time.perf_counter() - start, "bytes_read": done, "peak_rss": peak_rss_bytes()}


DISK_THREADS = 4  # reads in flight per rank: the virtual disk here needs >= 2 for its rate (1 gets a third)


def disk_limit(rank: int, tp_size: int, files: list[str], barrier: Any) -> dict:
    """What the storage itself delivers: the rank's files read with O_DIRECT (no page cache on either side),
    DISK_THREADS 16 MiB reads in flight, into memory faulted in beforehand (untimed). Cold, no loader that
    reads these bytes from this disk can beat it."""
    import os
    import threading

    from shardstate.io.arena import Arena

    sizes = [Path(f).stat().st_size for f in files]
    pieces, at = [], 0
    for file, size in zip(files, sizes, strict=True):
        pieces += [(file, offset, at + offset, min(16 << 20, size - offset)) for offset in range(0, size, 16 << 20)]
        at += -(-size // 4096) * 4096
    memory = Arena(at)  # page-aligned, as O_DIRECT needs
    memory.populate(0, memory.size)  # untimed
    view = memory.view(0, memory.size)
    fds = {file: os.open(file, os.O_RDONLY | os.O_DIRECT) for file in files}
    todo = iter(pieces)
    lock = threading.Lock()
    done, failed = [0], []

    def read() -> None:
        while not failed:
            with lock:
                piece = next(todo, None)
            if piece is None:
                return
            file, offset, to, length = piece
            try:
                got = os.preadv(fds[file], [view[to : to + -(-length // 4096) * 4096]], offset)
            except OSError as exc:
                failed.append(exc)
                return
            with lock:
                done[0] += min(got, length)

    barrier.wait()
    start = time.perf_counter()
    threads = [threading.Thread(target=read) for _ in range(DISK_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    if failed:
        raise failed[0]
    return {"rank": rank, "seconds": seconds, "bytes_read": done[0], "peak_rss": peak_rss_bytes()}


def safetensors_copy(rank: int, tp_size: int, files: list[str], barrier: Any, model_dir: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from shardstate.models import open_model
    from shardstate.parallel.distributed import TPGroup
    from shardstate.parallel.layers import materialize

    model = open_model(model_dir).build_on_meta(TPGroup(rank, tp_size))
    materialize(model, torch.device("cpu"))
    params = dict(model.named_parameters())
    barrier.wait()
    start = time.perf_counter()
    nbytes = 0
    for file in files:
        for name, tensor in load_file(file).items():
            if name in params:
                params[name].data.copy_(tensor)
            nbytes += tensor.numel() * tensor.element_size()
    return {"rank": rank, "seconds": time.perf_counter() - start, "bytes_read": nbytes, "peak_rss": peak_rss_bytes()}


def _child(
    fn: str, rank: int, tp_size: int, files: list[str], barrier: Any, queue: Any, driver: Any, extra: tuple
) -> None:
    watch_driver(driver)
    try:
        module, _, name = fn.rpartition(":")  # "module:function" for a rank function of another module
        function = getattr(importlib.import_module(module), name) if module else globals()[name]
        queue.put(function(rank, tp_size, files, barrier, *extra))
    except Exception as exc:
        barrier.abort()
        queue.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"})


def run_ranks(fn: str, rank_files: list[list[Path]] | list[list[str]], *extra: Any) -> list[dict]:
    """Run `fn` (a function here, or "module:function") in one process per rank; each gets its own files;
    results in rank order."""
    context = mp.get_context("spawn")
    tp_size = len(rank_files)
    barrier, queue = context.Barrier(tp_size), context.Queue()
    worker_end, driver_end = lifeline(context)
    procs = [
        context.Process(target=_child,
                        args=(fn, r, tp_size, [str(f) for f in files], barrier, queue, worker_end, extra))
        for r, files in enumerate(rank_files)
    ]
    done = False
    try:
        for proc in procs:
            with starting_worker():
                proc.start()
        worker_end.close()
        results = [queue.get(timeout=600) for _ in procs]
        done = True
    finally:  # stopped or failed half-way: no rank outlives the call
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=30 if done else 0)
                proc.kill()  # only if still running
                proc.join()
        driver_end.close()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    return sorted(results, key=lambda r: r["rank"])


def s3_download(rank: int, tp_size: int, names: list[str], barrier: Any, url: str) -> dict:
    """Plain boto3: each object downloaded into memory with s3transfer's parallel ranged GETs (its
    defaults), nothing written or checked: the remote yardstick."""
    import io

    import boto3

    from shardstate.io.s3 import S3Location

    location = S3Location.parse(url)
    client = boto3.client("s3")
    barrier.wait()
    start = time.perf_counter()
    nbytes = 0
    for name in names:
        buffer = io.BytesIO()
        client.download_fileobj(location.bucket, location.key(name), buffer)
        nbytes += len(buffer.getbuffer())
    return {"rank": rank, "seconds": time.perf_counter() - start, "bytes_read": nbytes, "peak_rss": peak_rss_bytes()}
