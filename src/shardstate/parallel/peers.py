"""Waiting for the other ranks to finish loading without mistaking a slow download for a hung rank.

Ranks load at different speeds (one node's cache is warm, another fetches gigabytes from object storage),
and the first collective after the load waits only the group's time-out. So each rank, while loading,
publishes how many bytes it has read so far in the rendezvous store (a heartbeat thread), and after
loading waits until every rank says it is done: a rank not done counts as alive while its count moves;
one that neither finishes nor reads anything for the time-out is named as stuck."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist

from shardstate.errors import ShardstateError
from shardstate.parallel.distributed import TPGroup

BEAT_S = 0.5


def _client(group: TPGroup, timeout_s: float) -> dist.TCPStore:
    assert group.store is not None
    host, port = group.store
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _key(what: str, rank: int) -> str:
    # torchrun's agent keeps its store across restarts of the workers: one namespace per restart
    return f"shardstate/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{what}/{rank}"


@contextlib.contextmanager
def loading(group: TPGroup, progress: Callable[[], int], timeout_s: float) -> Iterator[None]:
    """Run the block (this rank's load) with a heartbeat, then wait for every other rank to load."""
    if group.size == 1:
        yield
        return
    store = _client(group, timeout_s)
    stop = threading.Event()

    def beat() -> None:
        beats = _client(group, timeout_s)  # a client of its own: the main thread uses `store`
        while not stop.wait(BEAT_S):
            beats.set(_key("read", group.rank), str(progress()))

    thread = threading.Thread(target=beat, name="shardstate-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    store.set(_key("loaded", group.rank), "1")
    _wait_for_peers(store, group, timeout_s)


def _wait_for_peers(store: dist.TCPStore, group: TPGroup, timeout_s: float) -> None:
    last: dict[int, tuple[str, float]] = {}
    while True:
        waiting = [r for r in range(group.size) if not store.check([_key("loaded", r)])]
        if not waiting:
            return
        now = time.monotonic()
        for rank in waiting:
            read = store.get(_key("read", rank)).decode() if store.check([_key("read", rank)]) else ""
            if rank not in last or last[rank][0] != read:
                last[rank] = (read, now)
            elif now - last[rank][1] > timeout_s:
                raise ShardstateError(f"rank {rank} read nothing for {timeout_s:g} s while loading", None,
                                      "a rank is hung or its storage stalled; if it is only slow, raise the timeout")
        time.sleep(BEAT_S)
