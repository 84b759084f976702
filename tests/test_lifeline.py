"""A Ctrl-C while a worker starts: held by the driver and acted on once the start returns (it was lost
before), while the new worker starts with SIGINT blocked and discards one pending when it begins to
watch its driver (a Ctrl-C is for the driver, which stops the workers)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shardstate.runtime.lifeline import CPP_LOG_LEVEL, lifeline, starting_worker, watch_driver


def _worker(queue, driver) -> None:
    queue.put(("blocked at start", signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C reaching the worker while it starts up
    watch_driver(driver)
    time.sleep(0.1)
    queue.put(("survived", signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


def test_a_ctrl_c_while_a_worker_starts_is_held_for_the_driver_not_lost():
    context = mp.get_context("spawn")
    queue = context.Queue()
    worker_end, driver_end = lifeline(context)
    proc = context.Process(target=_worker, args=(queue, worker_end), daemon=True)
    # a driver that acts on Ctrl-C (pytest may have started with SIGINT ignored, as a background job of a
    # non-interactive shell does: `make test &` in `bash -c`; an ignored Ctrl-C is rightly still ignored after
    # the start)
    earlier = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with starting_worker():
                proc.start()
                # the Ctrl-C, mid-start, to the main thread (os.kill to the process may reach another thread
                # of this test process, whose handler can run after the start under load: a full run once
                # failed so, while the same signal to a driver with no other threads is held every time)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                time.sleep(0.05)
            pytest.fail("the Ctrl-C during the start was lost")
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the driver's mask restored
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert queue.get(timeout=120) == ("blocked at start", True)
        assert queue.get(timeout=60) == ("survived", True)
        proc.join(timeout=60)
        assert proc.exitcode == 0
    finally:
        signal.signal(signal.SIGINT, earlier)
        proc.kill()
        driver_end.close()


FIRST_START = """
import multiprocessing as mp, signal
from shardstate.runtime.lifeline import starting_worker

def blocked(end):
    end.send(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))

if __name__ == "__main__":
    context = mp.get_context("spawn")
    reply, end = context.Pipe(duplex=False)  # a Queue's locks would start the resource tracker first
    proc = context.Process(target=blocked, args=(end,))
    with starting_worker():
        proc.start()
    print(reply.recv())
    proc.join()
"""


def test_the_first_worker_of_a_driver_starts_with_sigint_blocked_too(tmp_path):
    """A driver's first spawn also starts multiprocessing's resource tracker, whose start lifts its own
    SIGINT block when done: inside the held start, the first worker was let start with SIGINT deliverable
    (a Ctrl-C to the process group printed "Process SpawnProcess-1:" from its torch import)."""
    script = tmp_path / "driver.py"
    script.write_text(FIRST_START)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr


def _lost_peer(stderr_path: str) -> None:
    """A rank whose rendezvous store is gone (its host stopped): torch's C++ client complains as it retries."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with contextlib.suppress(Exception):
        dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=1), wait_for_workers=False)


@pytest.mark.parametrize("chosen", [None, "WARNING"])
def test_a_worker_keeps_torchs_warnings_about_lost_peers_off_stderr_unless_asked(tmp_path, monkeypatch, chosen):
    """A worker stopped because another rank failed must not print c10d's "retrying" warnings under the one
    error line (test_cli's bad-input case once had 33 lines); a level the user set is theirs."""
    if chosen is None:
        monkeypatch.delenv(CPP_LOG_LEVEL, raising=False)
    else:
        monkeypatch.setenv(CPP_LOG_LEVEL, chosen)
    context = mp.get_context("spawn")
    stderr = tmp_path / "stderr"
    proc = context.Process(target=_lost_peer, args=(str(stderr),), daemon=True)
    with starting_worker():
        proc.start()
    assert os.environ.get(CPP_LOG_LEVEL) == chosen  # the driver's environment as it was
    proc.join(timeout=120)
    warnings = [line for line in stderr.read_text().splitlines() if line.startswith("[W")]
    assert bool(warnings) == (chosen is not None), warnings
