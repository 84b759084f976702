"""Clean stops with real processes and real signals: SIGINT, SIGTERM and SIGHUP to the driver of
`generate`, `save` and `convert` (and to a Python program using LLM) stop and reap every worker, remove
the temporaries, print one line and exit 128 + the signal; after a SIGKILL of the driver its workers and
helpers notice and exit within seconds, and its staging directory goes too. Every process of a run
carries an environment marker, so the test finds them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shardstate.synthetic import make_llama_checkpoint
from test_worker_failures import processes_with_env

BIN = Path(sys.executable).parent
LONG_GENERATION = ["--prompt-ids", "1,2,3", "--max-new-tokens", "4000", "--ignore-eos"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """~50 MB fp32: a save or convert of it lasts long enough for a signal to land inside."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("stops") / "src", seed=3, vocab_size=4000, hidden_size=384, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
    )


def start(args: list[str], marker: str) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SHARDSTATE_TEST_MARKER": marker})


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_processes(marker: str) -> list[int]:
    return processes_with_env(f"SHARDSTATE_TEST_MARKER={marker}".encode())


def assert_nothing_left(marker: str, directory: Path, expected: list[str]) -> None:
    """Within a few seconds: no process of the run, and `directory` holds exactly `expected`."""
    wait_for(lambda: not run_processes(marker), 10, f"the run's processes to exit ({run_processes(marker)})")
    assert sorted(p.name for p in directory.iterdir()) == sorted(expected)


def workers_running(marker: str, count: int) -> Callable[[], bool]:
    return lambda: len(run_processes(marker)) >= count


def staging_exists(directory: Path) -> Callable[[], bool]:
    return lambda: any(p.name.startswith(".out.tmp-") for p in directory.iterdir())


def command(kind: str, model: Path, out: Path) -> list[str]:
    if kind == "generate":
        return [str(BIN / "shardstate"), "generate", str(model), "--tp", "2", *LONG_GENERATION]
    return [str(BIN / "shardstate"), kind, str(model), str(out), "--tp", "2", "--max-part-size", "2MB"]


def started(kind: str, model: Path, out: Path, marker: str) -> subprocess.Popen:
    """The command, once it is under way: its workers up (generate, save) or its staging directory made."""
    proc = start(command(kind, model, out), marker)
    if kind == "generate":
        wait_for(workers_running(marker, 4), 60, "the driver, its resource tracker and two workers")
        time.sleep(1.5)  # loaded and generating
    else:
        wait_for(staging_exists(out.parent), 60, f"{kind}'s staging directory")
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["generate", "save", "convert"])
def test_stop_signal_to_the_driver(model, tmp_path, kind, sig):
    marker = str(tmp_path)
    out = tmp_path / "out"
    proc = started(kind, model, out, marker)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    if proc.returncode == 0:  # the run finished before the signal arrived: nothing to check
        pytest.skip(f"{kind} finished before the signal")
    assert proc.returncode == 128 + sig, stderr
    lines = stderr.strip().splitlines()
    assert lines == [f"error: stopped by {sig.name}; workers stopped, temporaries removed"], stderr
    assert_nothing_left(marker, tmp_path, [])


@pytest.mark.parametrize("kind", ["generate", "save", "convert"])
def test_sigkill_of_the_driver_leaves_no_process_and_no_temporary(model, tmp_path, kind):
    marker = str(tmp_path)
    proc = started(kind, model, tmp_path / "out", marker)
    proc.kill()
    proc.wait(timeout=10)
    assert_nothing_left(marker, tmp_path, ["out"] if (tmp_path / "out").exists() else [])


LIBRARY_PROGRAM = """
    import sys
    from shardstate import LLM
    with LLM(sys.argv[1], tensor_parallel_size=2) as llm:
        print("ready", flush=True)
        if sys.argv[2] == "save":
            while True:
                llm.save_sharded_state(sys.argv[3], max_size=2_000_000, force=True)
        while True:
            llm.generate([[1, 2, 3]], max_new_tokens=4000, ignore_eos=True)
"""


@pytest.mark.parametrize("sig,work", [(signal.SIGTERM, "generate"), (signal.SIGHUP, "save")],
                         ids=["SIGTERM-generate", "SIGHUP-save"])
def test_stop_signal_to_a_program_using_the_library(model, tmp_path, sig, work):
    """The program keeps its default handlers: it dies of the signal (a shell sees 128 + the number), after
    one line, its workers killed and its staging directory removed."""
    marker = str(tmp_path / "run")
    out = tmp_path / "out"
    proc = start([sys.executable, "-c", textwrap.dedent(LIBRARY_PROGRAM), str(model), work, str(out)], marker)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    if work == "save":
        wait_for(staging_exists(tmp_path), 60, "a save's staging directory")
    else:
        time.sleep(0.5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -sig, stderr
    assert stderr.strip().splitlines() == [f"error: stopped by {sig.name}; workers stopped, temporaries removed"]
    assert_nothing_left(marker, tmp_path, ["out"] if out.exists() else [])


def test_stop_signal_to_bench(tmp_path):
    """Wherever the benchmark is (making its model, converting, timing loads in workers or peers), a
    SIGTERM stops it whole and leaves no temporary in its output or cache directory."""
    marker = str(tmp_path / "run")
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = start([str(BIN / "shardstate"), "bench", "--smoke", "--tp", "1", "2", "--out", str(out),
                  "--cache-dir", str(cache)], marker)
    wait_for(lambda: (cache / "smoke-llama").exists() and len(run_processes(marker)) >= 3, 120,
             "the benchmark's model and its first workers")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM; workers stopped, temporaries removed"
    wait_for(lambda: not run_processes(marker), 10, "the run's processes to exit")
    left = [p.name for d in (out, cache) if d.exists() for p in d.iterdir()]
    assert not [name for name in left if ".tmp-" in name or name.endswith((".partial", ".bin"))], left


def test_ctrl_c_to_the_whole_process_group_while_workers_start(model, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, workers still importing torch included:
    still one line, and nothing left."""
    marker = str(tmp_path)
    proc = subprocess.Popen(command("generate", model, tmp_path / "out"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "SHARDSTATE_TEST_MARKER": marker})
    wait_for(workers_running(marker, 4), 60, "the workers to start")  # driver, resource tracker, 2 workers
    time.sleep(0.3)  # the workers are importing torch (a Ctrl-C in the ms a worker's start takes is lost)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip().splitlines() == ["error: stopped by SIGINT; workers stopped, temporaries removed"]
    assert_nothing_left(marker, tmp_path, [])


def test_ctrl_c_before_the_command_has_imported_anything(model, tmp_path):
    proc = start(command("convert", model, tmp_path / "out"), str(tmp_path))
    time.sleep(0.15)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip().splitlines() == ["error: stopped by SIGINT; workers stopped, temporaries removed"]
    assert list(tmp_path.iterdir()) == []
