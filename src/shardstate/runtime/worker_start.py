"""A spawned worker's first code. It imports nothing heavy, so that the rank's load memory is reserved
and being faulted in (io/arena.py) while the worker imports torch, joins its group and builds its model:
on the 2-core VM those take about a second, as long as faulting in a 2.4 GB rank's memory."""

from __future__ import annotations

from multiprocessing.connection import Connection

from shardstate.io.arena import Reservation


def start_worker(
    conn: Connection, driver: Connection, rank: int, size: int, init_method: str, threads: int, timeout_s: float,
    reserve_bytes: int,
) -> None:
    """worker_main, with `reserve_bytes` of load memory reserved first (0: none)."""
    memory = Reservation(reserve_bytes) if reserve_bytes else None
    from shardstate.runtime.worker import worker_main  # torch: imported while the reservation faults pages in

    worker_main(conn, driver, rank, size, init_method, threads, timeout_s, memory)
