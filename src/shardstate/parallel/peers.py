"""Waiting for the other ranks to finish loading without mistaking a slow download for a hung rank.

Ranks load at different speeds (one node's cache is warm, another fetches gigabytes from object storage),
and the first collective after the load waits only the group's time-out. So each rank, while loading,
publishes how many bytes it has read so far in the rendezvous store (a heartbeat thread), and after
loading waits until every rank says it is done: a rank not done counts as alive while its count moves;
one that neither finishes nor reads anything for the time-out is named as stuck."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist

from shardstate.errors import ShardstateError
from shardstate.parallel.distributed import TPGroup

BEAT_S = 0.5


def _client(group: TPGroup, timeout_s: float) -> dist.TCPStore:
    host, port = group.store
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _key(group: TPGroup, what: str, rank: int) -> str:
    return f"shardstate/{group.run}/{what}/{rank}"


@contextlib.contextmanager
def loading(group: TPGroup, progress: Callable[[], int], timeout_s: float) -> Iterator[None]:
    """Run the block (this rank's load) with a heartbeat, then wait for every other rank to load. A rank
    whose load fails says so, and the others stop waiting."""
    if group.world_size == 1 or group.store is None:
        yield
        return
    with _store_errors(group):
        store = _client(group, timeout_s)
    stop = threading.Event()

    def beat() -> None:
        with contextlib.suppress(Exception):  # a store gone is for the main thread to report, once
            beats = _client(group, timeout_s)  # a client of its own: the main thread uses `store`
            while not stop.wait(BEAT_S):
                beats.set(_key(group, "read", group.world_rank), str(progress()))

    thread = threading.Thread(target=beat, name="shardstate-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            store.set(_key(group, "failed", group.world_rank), str(exc)[:300])
        raise
    finally:
        stop.set()
        thread.join()
    with _store_errors(group):
        store.set(_key(group, "loaded", group.world_rank), "1")
        _wait_for_peers(store, group, timeout_s)


@contextlib.contextmanager
def _store_errors(group: TPGroup) -> Iterator[None]:
    try:
        yield
    except dist.DistError as exc:  # the store's host (rank 0, or torchrun's agent) is gone or unreachable
        host, port = group.store
        raise ShardstateError(f"the rendezvous store at {host}:{port} stopped answering ({str(exc)[:120]})", None,
                              "check the other ranks' output: rank 0 (or its node) may have stopped") from None


def _wait_for_peers(store: dist.TCPStore, group: TPGroup, timeout_s: float) -> None:
    last: dict[int, tuple[str, float]] = {}
    for attempt in itertools.count():
        waiting = [r for r in range(group.world_size) if not store.check([_key(group, "loaded", r)])]
        if not waiting:
            return
        now = time.monotonic()
        for rank in waiting:
            if store.check([_key(group, "failed", rank)]):
                reason = store.get(_key(group, "failed", rank)).decode(errors="replace")
                raise ShardstateError(f"rank {rank} failed while loading ({reason})")
            read_key = _key(group, "read", rank)
            read = store.get(read_key).decode() if store.check([read_key]) else ""
            if rank not in last or last[rank][0] != read:
                last[rank] = (read, now)
            elif now - last[rank][1] > timeout_s:
                raise ShardstateError(f"rank {rank} read nothing for {timeout_s:g} s while loading", None,
                                      "a rank is hung or its storage stalled; if it is only slow, raise the timeout")
        time.sleep(min(BEAT_S, 0.005 * 2**attempt))  # ranks mostly finish close together: look again soon
