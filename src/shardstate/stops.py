"""How SIGINT, SIGTERM and SIGHUP stop a process that runs shardstate work.

- The `shardstate` command turns each into `Stopped`, raised wherever the process was, so that every
  `with` block and `finally` clause runs: workers are killed and reaped, staging directories removed;
  the command prints one line and exits with 128 + the signal number (`raising_stops`).
- A Python program using the library keeps its own handlers. Where a signal's handler is the default
  one (death), the library adds clean-ups to run first (`on_default_death`): the process still dies of
  that signal (a shell sees 128 + the number), after one line and with its workers killed and its
  staging directories removed. SIGINT's default in Python is KeyboardInterrupt, which unwinds like
  `Stopped` does.
Whatever happens to the driver, its workers also watch it (runtime/lifeline.py) and a janitor process
watches each staging directory (io/janitor.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEATH_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # those whose default action ends the process


class Stopped(BaseException):
    """A stop signal arrived (BaseException: code that handles errors must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.outcome = CLEANED_UP  # what the stop left: whoever cleaned up on the way may say more exactly

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def line(self) -> str:
        return stopped_line(self.signum, self.outcome)


CLEANED_UP = "workers stopped, temporaries removed"


def stopped_line(signum: int, outcome: str = CLEANED_UP) -> str:
    """The one line a stopped command or program prints."""
    return f"error: stopped by {signal.Signals(signum).name}; {outcome}"


def _raise_stopped(signum: int, frame: object) -> None:
    for sig in STOP_SIGNALS:  # a second signal must not interrupt the clean-up the first one started
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def raising_stops() -> Iterator[None]:
    """Within the block, a stop signal raises Stopped (the command's main thread only)."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_cleanups: dict[int, Callable[[], None]] = {}
_owner = os.getpid()  # clean-ups belong to the process that registered them, not to its forked children
_installed: set[int] = set()
_lock = threading.RLock()  # re-entrant: the handler may run while the main thread holds it


def _forked_child() -> None:
    global _owner
    _cleanups.clear()
    _owner = os.getpid()


os.register_at_fork(after_in_child=_forked_child)


def _die_after_cleanups(signum: int, frame: object) -> None:
    for sig in DEATH_SIGNALS:  # a second signal must not run the clean-ups twice
        signal.signal(sig, signal.SIG_IGN)
    with _lock:
        cleanups = list(_cleanups.values()) if os.getpid() == _owner else []
    if cleanups:
        print(stopped_line(signum), file=sys.stderr)
    for cleanup in cleanups:
        with contextlib.suppress(Exception):
            cleanup()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def on_default_death(key: object, cleanup: Callable[[], None]) -> None:
    """Run `cleanup` before the process dies of a SIGTERM or SIGHUP left at its default action. From a
    thread other than the main one no handler can be set: the lifeline and the janitor still clean up."""
    with _lock:
        _cleanups[id(key)] = cleanup
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in DEATH_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _die_after_cleanups)
                _installed.add(sig)


def forget(key: object) -> None:
    """`key`'s clean-up is done or no longer needed; the last one gone restores the default handlers (from
    the main thread; elsewhere the handler stays, and with nothing to clean up it just lets the process
    die of the signal)."""
    with _lock:
        _cleanups.pop(id(key), None)
        if _cleanups or threading.current_thread() is not threading.main_thread():
            return
        for sig in list(_installed):
            if signal.getsignal(sig) == _die_after_cleanups:
                signal.signal(sig, signal.SIG_DFL)
            _installed.discard(sig)
