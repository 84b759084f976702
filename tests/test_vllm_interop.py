"""shardstate and vLLM read each other's sharded states (run by `make test-vllm`, which sets up vLLM's
CPU build in its own venv; skipped where vLLM is not importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from shardstate.convert import convert
from shardstate.synthetic import make_llama_checkpoint

pytestmark = pytest.mark.vllm
PEER = Path(__file__).resolve().parents[1] / "src" / "shardstate" / "benchmark" / "vllm_peer.py"
KEEPWEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "vllm-keepweights"
PROMPTS = ["1,5,9,33,7,120", "4,100,2,8", "150"]
BIN = Path(sys.executable).parent


def vllm(*args: str, keep_weights: bool = False) -> dict:
    env = dict(os.environ)
    if keep_weights:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(KEEPWEIGHTS), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(PEER), *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith('{"')]  # vLLM logs to stdout too
    return json.loads(line)


def prompt_args() -> list[str]:
    return [a for p in PROMPTS for a in ("--prompt-ids", p)]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(tmp_path_factory, request) -> Path:
    """Untied and tied Llama (tied: vLLM's files hold `lm_head.weight`, and so must shardstate's); head_dim
    64: a size vLLM's CPU attention supports."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("vllm") / "llama", seed=3, hidden_size=256, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=request.param,
    )


@pytest.fixture(scope="module")
def vllm_default_tokens(checkpoint) -> list[list[int]]:
    return vllm("generate", str(checkpoint), "--tp", "2", *prompt_args())["outputs"]


def shardstate_tokens(model_dir: Path) -> list[list[int]]:
    result = subprocess.run(
        [str(BIN / "shardstate"), "generate", str(model_dir), "--tp", "2", "--ignore-eos", "--json",
         "--max-new-tokens", "8", *prompt_args()], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [o["token_ids"] for o in json.loads(result.stdout)["outputs"]]


def test_vllm_loads_shardstate_convert_output(checkpoint, vllm_default_tokens, tmp_path):
    convert(checkpoint, tmp_path / "tp2", 2)
    tokens = vllm("generate", str(tmp_path / "tp2"), "--tp", "2", "--load-format", "sharded_state", *prompt_args())
    assert tokens["outputs"] == vllm_default_tokens
    assert shardstate_tokens(checkpoint) == vllm_default_tokens


def test_shardstate_loads_vllm_saved_state(checkpoint, vllm_default_tokens, tmp_path):
    saved = tmp_path / "vllm-tp2"
    vllm("save", str(checkpoint), str(saved), "--tp", "2", keep_weights=True)
    assert not (saved / "shardstate.json").exists()
    assert shardstate_tokens(saved) == vllm_default_tokens
