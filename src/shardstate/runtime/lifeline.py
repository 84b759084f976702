"""Workers never outlive their driver. Each worker gets the read end of a pipe whose only write end the
driver holds; a thread in the worker blocks on it and ends the process at EOF, which comes the moment
the driver exits, however it dies (SIGKILL included). Unlike a parent-death signal, this does not
depend on which of the driver's threads started the worker."""

from __future__ import annotations

import contextlib
import os
import threading
from multiprocessing.connection import Connection
from typing import Any

EXIT_DRIVER_GONE = 3


def lifeline(context: Any) -> tuple[Connection, Connection]:
    """(worker's end, driver's end): pass the first to the worker, keep the second until the worker ends."""
    return context.Pipe(duplex=False)


def watch_driver(end: Connection) -> None:
    """In the worker: exit at once, whatever the main thread is doing, when the driver is gone."""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            end.recv_bytes()
        os._exit(EXIT_DRIVER_GONE)

    threading.Thread(target=watch, name="shardstate-lifeline", daemon=True).start()
