"""Workers never outlive their driver. Each worker gets the read end of a pipe whose only write end the
driver holds (a child the driver's program forks closes its copy); a thread in the worker blocks on it
and ends the process at EOF, which comes the moment the driver exits, however it dies (SIGKILL
included). Unlike a parent-death signal, this does not depend on which of the driver's threads started
the worker."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext

EXIT_DRIVER_GONE = 3


_driver_ends: weakref.WeakSet[Connection] = weakref.WeakSet()


def _close_in_forked_child() -> None:
    """A child forked by the driver's program (a Pool, a DataLoader) must not keep the workers alive."""
    for end in list(_driver_ends):
        with contextlib.suppress(OSError):
            end.close()


os.register_at_fork(after_in_child=_close_in_forked_child)


def lifeline(context: BaseContext) -> tuple[Connection, Connection]:
    """(worker's end, driver's end): pass the first to the worker, keep the second until the worker ends."""
    worker_end, driver_end = context.Pipe(duplex=False)
    _driver_ends.add(driver_end)
    return worker_end, driver_end


CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"


@contextlib.contextmanager
def starting_worker() -> Iterator[None]:
    """Start a worker with SIGINT held (below) and with torch's C++ log at ERROR unless the user chose a
    level (an environment the worker inherits: torch reads it once, at import): a rank stopped because
    another failed would otherwise print c10d's warnings about its lost peers ("Connection reset by
    peer ... retrying") beneath the one line that names the failure."""
    chosen = CPP_LOG_LEVEL in os.environ
    os.environ.setdefault(CPP_LOG_LEVEL, "ERROR")
    try:
        with _stops_held():
            yield
    finally:
        if not chosen:
            os.environ.pop(CPP_LOG_LEVEL, None)


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Start a worker with SIGINT blocked (a mask it inherits through fork and exec), so a terminal's
    Ctrl-C while it imports torch stays pending in it until `watch_driver` discards it: Ctrl-C is for the
    driver. In the driver, SIGINT, SIGTERM and SIGHUP that arrive during the start are held until it
    returns, then acted on: acted on inside `Process.start()`, one would cut the pipe the new process reads
    its start-up data from, and that process would print a traceback; ignored (SIG_IGN, as before), a
    Ctrl-C in those milliseconds was lost. (Handlers belong to the main thread: from another, the worker
    starts as it is and ignores SIGINT once `watch_driver` runs.) The spawn context's resource tracker is
    started first: its own start unblocks SIGINT when it is done (bpo-33613's mask, lifted with
    SIG_UNBLOCK), so started inside the block it let the first worker start with SIGINT deliverable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resource_tracker.ensure_running()
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C pending meanwhile is held now
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def watch_driver(end: Connection) -> None:
    """In the worker: exit at once, whatever the main thread is doing, when the driver is gone; leave a
    terminal's Ctrl-C to the driver."""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            end.recv_bytes()
        os._exit(EXIT_DRIVER_GONE)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the driver, which stops the workers;
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pending since the start is discarded
    threading.Thread(target=watch, name="shardstate-lifeline", daemon=True).start()
