"""--force replaces only what shardstate wrote. Every case runs the real command (`shardstate convert` or
`save` through the CLI's main) and lists every file under the test's directory before and after: nothing
that shardstate did not write is ever removed or changed."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shardstate.cli import main
from shardstate.convert import convert
from shardstate.format.safetensors_header import read_header
from shardstate.state_info import verify_state
from shardstate.store.output import STAGING_MARKER, remove_replaced


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: a file's bytes, a link's target, a directory's mark."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


def run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def world(checkpoints, tmp_path) -> Path:
    """tmp/parent/model (a copy of a HF checkpoint) with a sibling file of the user's."""
    model = tmp_path / "parent" / "model"
    shutil.copytree(checkpoints["gqa_untied"], model)
    (tmp_path / "parent" / "notes.txt").write_text("the user's")
    return tmp_path


def user_dir(w: Path) -> Path:
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("irreplaceable")
    return w / "mine"


def regular_file(w: Path) -> Path:
    (w / "file").write_text("data")
    return w / "file"


def symlink_to_state(w: Path) -> Path:
    convert(w / "parent" / "model", w / "state", 1)
    (w / "link").symlink_to(w / "state")
    return w / "link"


def dangling_symlink(w: Path) -> Path:
    (w / "link").symlink_to(w / "nowhere")
    return w / "link"


def state_with_user_file(w: Path) -> Path:
    convert(w / "parent" / "model", w / "state", 1)
    (w / "state" / "README.md").write_text("my notes on this state")
    return w / "state"


REFUSED = {
    "user directory": (user_dir, "mine is a directory shardstate did not write (no shardstate.json): choose"),
    "the source": (lambda w: w / "parent" / "model", "model is the source itself: choose a new path"),
    "parent of the source": (lambda w: w / "parent", "parent is a directory holding the source"),
    "regular file": (regular_file, "file exists and is a regular file: choose a new path, or remove it yourself"),
    "symlink": (symlink_to_state, "link is a symlink (to "),
    "dangling symlink": (dangling_symlink, "link is a dangling symlink (to "),
    "state holding a user's file": (state_with_user_file, "it holds 'README.md', which shardstate did not write"),
    "dot": (lambda w: Path("."), "error: output . is '.', '..' or a root"),
    "dot dot": (lambda w: Path("model/.."), "error: output model/.. is '.', '..' or a root"),
}


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_convert_refuses_what_shardstate_did_not_write(world, capsys, monkeypatch, case, force):
    make, expected = REFUSED[case]
    out = make(world)
    monkeypatch.chdir(world / "parent")
    before = snapshot(world)
    code, lines = run(capsys, "convert", str(world / "parent" / "model"), str(out), "--tp", "2",
                      *(["--force"] if force else []))
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "another writer" not in lines[0]
    assert snapshot(world) == before


def test_save_refuses_the_source_and_a_user_directory_before_starting_workers(world, capsys):
    for out, expected in ((world / "parent", "parent is a directory holding the source"),
                          (user_dir(world), "did not write (no shardstate.json)")):
        before = snapshot(world)
        code, lines = run(capsys, "save", str(world / "parent" / "model"), str(out), "--tp", "2", "--force")
        assert code == 1 and len(lines) == 1 and expected in lines[0], lines
        assert snapshot(world) == before


def test_mount_point_is_refused(checkpoints, capsys):
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    point = next(m for m in mounts if m != "/" and os.path.isdir(m) and not os.path.islink(m))
    code, lines = run(capsys, "convert", str(checkpoints["gqa_untied"]), point, "--tp", "2", "--force")
    assert code == 1 and len(lines) == 1 and f"output {point} is a mount point" in lines[0], lines


@pytest.mark.parametrize("command", ["convert", "save"])
def test_force_replaces_a_sharded_state_and_cleans_unfinished_temporaries(world, capsys, command):
    src, out = world / "parent" / "model", world / "out"
    convert(src, out, 1)
    old_state = read_header(out / "model-rank-0-part-0.safetensors").metadata["state"]
    stale = world / ".out.tmp-999999999-0badcafe"  # a killed writer's: marked as shardstate's, lock free
    stale.mkdir()
    (stale / STAGING_MARKER).touch()
    (stale / "model-rank-0-part-0.safetensors").write_bytes(b"half")
    lookalike = world / ".out.tmp-999999998-0badcafe"  # same name pattern, no marker: not shardstate's, kept
    lookalike.mkdir()
    (lookalike / "data").write_text("someone's")
    live = world / ".out.tmp-999999997-0badcafe"  # a writer still at work (perhaps on another host): kept
    live.mkdir()
    with open(live / STAGING_MARKER, "w") as marker:
        fcntl.flock(marker, fcntl.LOCK_EX)
        before = snapshot(world)
        code, lines = run(capsys, command, str(src), str(out), "--tp", "2", "--force")
    assert code == 0, lines
    assert all(c.ok for c in verify_state(out))
    assert read_header(out / "model-rank-0-part-0.safetensors").metadata["state"] != old_state
    assert not stale.exists() and lookalike.exists() and live.exists()
    after = snapshot(world)
    untouched = {k: v for k, v in before.items() if not k.startswith(("out", stale.name))}
    assert {k: v for k, v in after.items() if k in untouched} == untouched
    assert sorted(p.name for p in world.iterdir()) == sorted([lookalike.name, live.name, "out", "parent"])


def test_staging_cleanup_matches_names_exactly(world, capsys):
    """OUT `run[1]` is a glob pattern that would match `run1`'s staging directory: it must not."""
    other = world / ".run1.tmp-999999999-0badcafe"
    other.mkdir()
    (other / STAGING_MARKER).touch()
    assert run(capsys, "convert", str(world / "parent" / "model"), str(world / "run[1]"), "--tp", "1")[0] == 0
    assert other.exists()


def test_new_output_inside_the_source_and_a_255_character_name_are_allowed(world, capsys):
    src = world / "parent" / "model"
    inside = src / "tp2"
    assert run(capsys, "convert", str(src), str(inside), "--tp", "2")[0] == 0
    assert all(c.ok for c in verify_state(inside))
    long_name = world / ("n" * 255)
    code, lines = run(capsys, "convert", str(src), str(long_name), "--tp", "1")
    assert code == 0, lines
    assert all(c.ok for c in verify_state(long_name))
    code, lines = run(capsys, "convert", str(src), str(long_name), "--tp", "2", "--force")  # staging name fits too
    assert code == 0, lines
    assert sorted(p.name for p in world.iterdir()) == ["n" * 255, "parent"]


def test_a_replace_that_cannot_remove_the_previous_version_succeeds_with_a_warning(world, capsys):
    """The new OUT is in place once swapped in: a file of the previous version that may not be removed
    (immutable) is a warning naming where that version was kept, never 'nothing was published'."""
    src, out = world / "parent" / "model", world / "out"
    convert(src, out, 1)
    stuck = out / "config.json"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        code, lines = run(capsys, "convert", str(src), str(out), "--tp", "2", "--force")
        kept = [p for p in world.iterdir() if p.name.startswith(".out.tmp-")]
        assert code == 0 and all(c.ok for c in verify_state(out)), lines
        assert len(kept) == 1 and lines == [
            f"warning: the output was replaced, but its previous version is kept at {kept[0]} (config.json: "
            "Operation not permitted); check and remove it yourself"]
    finally:
        for path in world.rglob("config.json"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_removing_a_replaced_version_never_follows_a_link_put_in_its_place(tmp_path, capsys):
    """Were OUT swapped for a link in the instant before the exchange, the link is what comes back: the
    names of the old manifest are never removed through it."""
    target = tmp_path / "someone-elses"
    target.mkdir()
    (target / "config.json").write_text("theirs")
    (tmp_path / "old").symlink_to(target)
    remove_replaced(tmp_path / "old", {"config.json", "shardstate.json"})
    assert (target / "config.json").read_text() == "theirs"
    assert "warning: the output was replaced, but its previous version is kept at" in capsys.readouterr().err
