"""The `shardstate` command as a user runs it: JSON output, torchrun, and one-line refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import transformers_greedy
from shardstate.convert import convert

BIN = Path(sys.executable).parent


def shardstate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, timeout=300)


def test_generate_json_matches_transformers(checkpoints):
    model_dir = checkpoints["gqa_untied"]
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    result = shardstate(
        "generate", str(model_dir), "--tp", "2", "--load-format", "sliced", "--json", "--ignore-eos",
        "--max-new-tokens", "5", *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))],
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    ref_tokens, _ = transformers_greedy(model_dir, prompts, 5)
    assert [o["token_ids"] for o in doc["outputs"]] == ref_tokens
    assert [r["rank"] for r in doc["load"]] == [0, 1]
    for report in doc["load"]:
        assert report["seconds"] > 0 and report["bytes_read"] > 0
        assert [Path(f).name for f in report["files"]] == ["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_generate_under_torchrun(checkpoints, tmp_path, sharded):
    """Each rank a torchrun process, from the HF checkpoint and from a sharded state; either way a rank
    reserves its load memory and faults it in as it joins its group (bytes_prefaulted)."""
    model_dir = checkpoints["mha_tied"]
    source = model_dir
    if sharded:
        convert(model_dir, source := tmp_path / "tp2", 2)
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
         str(BIN / "shardstate"), "generate", str(source), "--tp", "2", "--prompt-ids", "5,6,7",
         "--max-new-tokens", "4", "--ignore-eos", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]  # rank 0 prints, once
    doc = json.loads(line)
    assert [o["token_ids"] for o in doc["outputs"]] == transformers_greedy(model_dir, [[5, 6, 7]], 4)[0]
    assert [r["rank"] for r in doc["load"]] == [0, 1]
    assert all(r["bytes_prefaulted"] > 0 for r in doc["load"])  # the read arena, or the parameters


def broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return dst


def edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def drop(name):
    return lambda state: {k: v for k, v in state.items() if k != name}


def narrow(name):
    return lambda state: {**state, name: state[name][:, :-1].contiguous()}


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing config", "config.json not found"),
        ("unsupported architecture", "unsupported architecture 'GPTNeoXForCausalLM'"),
        ("missing tensor", "tensor 'model.layers.1.mlp.down_proj.weight' is missing"),
        ("shape mismatch", "tensor 'model.layers.0.self_attn.o_proj.weight' has shape [64, 63]"),
        ("tp does not divide heads", "TP size 3 does not divide num_attention_heads=4"),
        ("not a directory", "not a directory"),
    ],
)
def test_bad_input_is_one_error_line(checkpoints, tmp_path, case, expected):
    src = checkpoints["gqa_untied"]
    model_dir, tp = {
        "missing config": lambda: (tmp_path, "2"),
        "unsupported architecture": lambda: (
            edit_config(src, tmp_path / "m", architectures=["GPTNeoXForCausalLM"]), "2"
        ),
        "missing tensor": lambda: (broken_copy(src, tmp_path / "m", drop("model.layers.1.mlp.down_proj.weight")), "2"),
        "shape mismatch": lambda: (
            broken_copy(src, tmp_path / "m", narrow("model.layers.0.self_attn.o_proj.weight")), "2"
        ),
        "tp does not divide heads": lambda: (src, "3"),
        "not a directory": lambda: (tmp_path / "nothing-here", "1"),
    }[case]()
    result = shardstate("generate", str(model_dir), "--tp", tp, "--prompt-ids", "1,2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_usage_errors_exit_2():
    assert shardstate("generate", "somewhere").returncode == 2  # no prompt
    assert shardstate("generate", "somewhere", "--prompt-ids", "1,x").returncode == 2
