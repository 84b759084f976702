"""Inputs refused exactly, in one line, before any request or write: s3:// locations that do not name one
bucket and one prefix, cache directories that are not directories, JSON nested past what a parser can
take, MoE bounds that are another key's value, a manifest that inspect must flag as load refuses it; and
temporaries of dead processes (PID and start time) told from live ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shardstate.config import ConfigReader
from shardstate.errors import ShardstateError
from shardstate.processes import process_tag, tag_alive
from test_bounds import run_cases
from test_cli import edit_config

BIN = Path(sys.executable).parent


def one_error_line(result: tuple[int | None, str]) -> str:
    code, stderr = result
    assert code == 1, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: "), line
    return line


BAD_LOCATIONS = {  # location -> what the one line says
    "s3://b//st": "'b' is not a valid bucket name",
    "s3://bucket//st": "an empty path segment '//'",
    "s3://bucket/st//": "an empty path segment '//'",
    "s3://bucket/a/../st": "a '.' or '..' segment",
    "s3://bucket/./st": "a '.' or '..' segment",
    "s3://bucket/st\nerror: injected": "a control character",
    "s3://bucket/st\x1b[2J": "a control character",
    "s3://Bucket_Name/st": "'Bucket_Name' is not a valid bucket name",
    "s3://192.168.0.1/st": "'192.168.0.1' is not a valid bucket name",
    "s3://my..bucket/st": "'my..bucket' is not a valid bucket name",
    "s3:///st": "'' is not a valid bucket name",
}


@pytest.fixture(scope="module")
def location_results(tmp_path_factory) -> list[tuple[int | None, str]]:
    """Every command that takes an s3:// location, on each bad one, with the endpoint pointing at a closed
    port: a refusal that came after a request would say the endpoint cannot be reached."""
    cache = str(tmp_path_factory.mktemp("cache"))
    argvs = []
    for location in BAD_LOCATIONS:
        argvs += [["generate", location, "--prompt-ids", "1", "--cache-dir", cache],
                  ["inspect", location, "--cache-dir", cache], ["verify", location, "--cache-dir", cache],
                  ["upload", cache, location], ["convert", location, str(Path(cache) / "out"), "--tp", "1"]]
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard: nothing answers there
    try:
        return run_cases(argvs)
    finally:
        del os.environ["AWS_ENDPOINT_URL"]


@pytest.mark.parametrize("case", range(len(BAD_LOCATIONS)), ids=[repr(u) for u in BAD_LOCATIONS])
def test_bad_s3_locations_are_refused_before_any_request(location_results, case):
    reason = list(BAD_LOCATIONS.values())[case]
    generate, inspect, verify, upload, convert = location_results[5 * case:5 * case + 5]
    for result in (generate, inspect, verify, convert):
        assert f"is not an s3://bucket/prefix location ({reason})" in one_error_line(result)
    assert "cannot reach" not in one_error_line(upload)  # refused before a request (DIR may be refused first)


def test_cache_directories_that_are_not_directories_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    url = "s3://bucket/state"
    cases = {  # --cache-dir value -> what the line says
        str(a_file): "--cache-dir is a file, not a directory",
        str(dangling): "--cache-dir leads through a dangling symlink",
        str(dangling / "below"): "--cache-dir leads through a dangling symlink",
        str(a_file / "below"): f"--cache-dir is under a file ({a_file}), not a directory",
        "": "--cache-dir is empty",
    }
    argvs = [[command, url, "--cache-dir", value] for value in cases for command in ("inspect", "verify")]
    argvs += [["convert", str(tmp_path), url, "--tp", "1", "--cache-dir", value] for value in cases]
    results = run_cases(argvs)
    for n, expected in enumerate(cases.values()):
        for result in (results[2 * n], results[2 * n + 1], results[2 * len(cases) + n]):
            line = one_error_line(result)
            assert expected in line and "set --cache-dir to a directory" in line, line
    env_cases = {str(a_file): "SHARDSTATE_CACHE_DIR is a file", "": "SHARDSTATE_CACHE_DIR is empty"}
    for value, expected in env_cases.items():
        monkeypatch.setenv("SHARDSTATE_CACHE_DIR", value)
        (result,) = run_cases([["inspect", url]])
        assert expected in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dangling"]  # nothing written anywhere
    assert not (Path.cwd() / "bucket-").exists()


def test_json_nested_past_the_parser_is_one_line(checkpoints, tmp_path):
    """config.json and the index go through the strict reader (a RecursionError traceback before)."""
    deep = "[" * 100_000 + "]" * 100_000
    nested_config = edit_config(checkpoints["gqa_untied"], tmp_path / "config")
    text = (nested_config / "config.json").read_text()
    (nested_config / "config.json").write_text(text.rstrip().rstrip("}") + f', "deep": {deep}}}')
    nested_index = edit_config(checkpoints["gqa_untied"], tmp_path / "index")
    (nested_index / "model.safetensors.index.json").write_text(f'{{"metadata": {deep}, "weight_map": {{}}}}')
    duplicate_keys = edit_config(checkpoints["gqa_untied"], tmp_path / "duplicate")
    (duplicate_keys / "config.json").write_text(text.rstrip().rstrip("}") + ', "vocab_size": 7}')
    results = run_cases([["generate", str(nested_config), "--prompt-ids", "1"],
                         ["convert", str(nested_config), str(tmp_path / "out1"), "--tp", "1"],
                         ["generate", str(nested_index), "--prompt-ids", "1"],
                         ["convert", str(nested_index), str(tmp_path / "out2"), "--tp", "1"],
                         ["generate", str(duplicate_keys), "--prompt-ids", "1"]])
    for result in results[:2]:
        assert "config.json is not valid JSON (nested too deeply)" in one_error_line(result)
    for result in results[2:4]:
        assert "invalid index (nested too deeply) in" in one_error_line(result)
    assert "config.json is not valid JSON (duplicate key 'vocab_size')" in one_error_line(results[4])
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_moe_bounds_name_the_key_they_come_from():
    cfg = {"num_local_experts": 4, "num_experts_per_tok": 5, "intermediate_size": 64, "num_hidden_layers": 2}
    reader = ConfigReader(cfg, json.dumps(cfg).encode(), Path("config.json"))
    with pytest.raises(ShardstateError, match=r"'num_experts_per_tok' is 5, above num_local_experts=4 in"):
        reader.moe("num_local_experts", "intermediate_size")
    cfg.update(num_experts_per_tok=2, decoder_sparse_step=3)
    with pytest.raises(ShardstateError, match=r"'decoder_sparse_step' is 3, above num_hidden_layers=2 in"):
        reader.moe("num_local_experts", "intermediate_size")
    cfg.update(decoder_sparse_step=1, num_local_experts=10**6)
    with pytest.raises(ShardstateError, match=r"'num_local_experts' is 1000000, above shardstate's limit of 4096"):
        reader.moe("num_local_experts", "intermediate_size")


def test_inspect_flags_what_load_refuses(checkpoints, tmp_path):
    """A rank file of another state (its own record disagrees with the manifest): load refuses it before
    reading a weight, so inspect does too (flagged, exit 1), not only verify."""
    from shardstate.convert import convert

    convert(checkpoints["gqa_untied"], tmp_path / "a", 2)
    convert(edit_config(checkpoints["gqa_untied"], tmp_path / "src-b", rms_norm_eps=1e-5), tmp_path / "b", 2)
    name = "model-rank-1-part-0.safetensors"
    (tmp_path / "a" / name).unlink()
    (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    inspected, verified, loaded = run_cases([["inspect", str(tmp_path / "a"), "--json"],
                                             ["verify", str(tmp_path / "a")],
                                             ["generate", str(tmp_path / "a"), "--tp", "2", "--prompt-ids", "1"]])
    for result in (inspected, verified, loaded):
        assert name in one_error_line(result)
    assert "1 rank file(s) would be refused by a load" in one_error_line(inspected)
    good = subprocess.run([str(BIN / "shardstate"), "inspect", str(tmp_path / "b"), "--json"], capture_output=True,
                          text=True, timeout=60)
    assert good.returncode == 0 and json.loads(good.stdout)["ok"], good.stderr


def test_a_process_is_its_pid_and_start_time():
    """A PID alone is reused: a tag with the PID of a live process but another start time is dead."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = process_tag(child.pid)
        assert tag_alive(tag) and tag_alive(process_tag())
        pid, started = tag.split("-")
        assert not tag_alive(f"{pid}-{int(started) + 1}")  # the PID reused by another process
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not tag_alive(tag)
    assert tag_alive("not-a-tag")  # not ours to judge
