"""Writes are atomic, proven by fault injection: SIGKILL at many points of `convert` and `save`, a file-size
limit (a full disk as the writer sees it), and two writers racing for one OUT. After each, OUT is absent
or complete and verifies; a previous OUT replaced with --force is never lost."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardstate.state_info import verify_state
from shardstate.synthetic import make_llama_checkpoint

BIN = Path(sys.executable).parent
KILL_POINTS = 20


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    """~50 MB fp32: long enough a write for kills to land inside it."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("atomic") / "src", seed=5, vocab_size=4000, hidden_size=384, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
    )


def command(kind: str, src: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "shardstate"), kind, str(src), str(out), "--tp", "2", "--max-part-size", "4MB", *extra]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - start


def assert_absent_or_complete(out: Path) -> str:
    if not out.exists():
        return "absent"
    checks = verify_state(out)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    return "complete"


def kill_at(cmd: list[str], delay: float) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer and, for `save`, its workers
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["convert", "save"])
def test_sigkill_anywhere_leaves_nothing_that_loads_half(mid_checkpoint, tmp_path, kind):
    full = timed(command(kind, mid_checkpoint, tmp_path / "timing"))
    outcomes = []
    for n in range(KILL_POINTS):
        out = tmp_path / f"out{n}"
        kill_at(command(kind, mid_checkpoint, out), full * (n + 0.5) / KILL_POINTS * 1.1)
        outcomes.append(assert_absent_or_complete(out))
    print(f"{kind}: {KILL_POINTS} kills -> {outcomes.count('absent')} absent, {outcomes.count('complete')} complete")
    assert "absent" in outcomes  # kills did land before the end
    # the next write to the same OUT clears what killed writers left behind
    subprocess.run(command(kind, mid_checkpoint, tmp_path / "out0", "--force"), check=True, capture_output=True)
    assert not list(tmp_path.glob(".out0.tmp-*"))


@pytest.mark.slow
def test_sigkill_during_force_replace_never_loses_out(mid_checkpoint, tmp_path):
    out = tmp_path / "out"
    full = timed(command("convert", mid_checkpoint, out))
    for n in range(10):
        kill_at(command("convert", mid_checkpoint, out, "--force"), full * (n + 0.5) / 10 * 1.1)
        assert assert_absent_or_complete(out) == "complete"


def test_file_size_limit_is_a_clean_error(mid_checkpoint, tmp_path):
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "out"
    result = subprocess.run(command("convert", mid_checkpoint, out), capture_output=True, text=True,
                            timeout=300, preexec_fn=small_files)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write (File too large)"), result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # temporary directory removed too


def test_two_writers_one_wins(mid_checkpoint, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(command("convert", mid_checkpoint, out), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert loser.startswith("error: ") and ("appeared while this command was writing" in loser
                                            or "is a sharded state already" in loser), loser
    assert assert_absent_or_complete(out) == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def small_source_with(checkpoints, tmp_path: Path, name: str, make) -> Path:
    src = tmp_path / "src"
    shutil.copytree(checkpoints["gqa_untied"], src)
    make(src / name)
    return src


def test_full_disk_while_copying_a_side_file_names_the_destination(checkpoints, tmp_path):
    """Rank files fit under the limit, the 3 MB tokenizer file does not: the line names OUT's copy."""
    src = small_source_with(checkpoints, tmp_path, "tokenizer.json", lambda p: p.write_bytes(b" " * 3_000_000))

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "out"
    result = subprocess.run([str(BIN / "shardstate"), "convert", str(src), str(out), "--tp", "2"],
                            capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: cannot write (File too large) in {out / 'tokenizer.json'}: check "
                                          "free space, file-size limits and permissions; nothing was published"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_read_failure_is_called_a_read_failure(checkpoints, tmp_path):
    """A side file whose read fails with EIO (a link to /proc/self/mem: reading its first page fails)."""
    src = small_source_with(checkpoints, tmp_path, "extra.json", lambda p: p.symlink_to("/proc/self/mem"))
    result = subprocess.run([str(BIN / "shardstate"), "convert", str(src), str(tmp_path / "out"), "--tp", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: cannot read (Input/output error) in {src / 'extra.json'}: "
                                          "check the file; nothing was published"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
