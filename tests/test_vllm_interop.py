"""shardstate and vLLM read each other's sharded states, family by family (run by `make test-vllm`, which sets
up vLLM's CPU build in its own venv; skipped where vLLM is not importable).

One vLLM run per checkpoint (module fixture `vllm_reference`) loads the source with vLLM's default loader,
generates the reference tokens and keeps vLLM's own TP=2 state: the dense families save it with the engine's
`save_sharded_state` (with peers/vllm-keepweights, since the CPU backend repacks linear weights and the saver
skips them), the MoE families dump it right after loading with peers/vllm-dumppre (the CPU backend also
repacks experts, which keepweights does not cover). Neither changes what vLLM computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from rank_files import rank_file_differences
from shardstate.convert import convert
from shardstate.synthetic import make_checkpoint

pytestmark = pytest.mark.vllm
PEER = Path(__file__).resolve().parents[1] / "src" / "shardstate" / "benchmark" / "vllm_peer.py"
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
KEEPWEIGHTS, DUMPPRE = PEERS / "vllm-keepweights", PEERS / "vllm-dumppre"
PROMPTS = ["1,5,9,33,7,120", "4,100,2,8", "150"]
BIN = Path(sys.executable).parent
TP = 2

# head_dim 64 (a size vLLM's CPU attention supports): hidden 256 over 4 heads, 2 kv heads; vocab 203 (not a
# multiple of 64: vLLM pads it); weights normal(0, 0.15) so that greedy tokens vary.
BASE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 203}
MOE = {"num_experts_per_tok": 2}
FAMILIES = {  # id: (architecture, config overrides, MoE); every family shardstate supports, ~75 s each
    "llama": ("LlamaForCausalLM", {}, False),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}, False),  # vLLM keeps lm_head.weight only
    "qwen2-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}, False),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 64}, False),
    "mixtral": ("MixtralForCausalLM", {**MOE, "num_local_experts": 4, "intermediate_size": 128}, True),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {**MOE, "num_experts": 4, "moe_intermediate_size": 64,
                                          "shared_expert_intermediate_size": 128, "num_hidden_layers": 3,
                                          "mlp_only_layers": [1]}, True),  # layer 1 is a dense MLP
    "qwen3-moe": ("Qwen3MoeForCausalLM", {**MOE, "num_experts": 4, "moe_intermediate_size": 64, "head_dim": 64,
                                          "norm_topk_prob": True}, True),
    "mistral": ("MistralForCausalLM", {}, False),
    "phi3": ("Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},  # fused qkv, gate_up
             False),
}


def vllm(*args: str, pythonpath: Path | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(PEER), *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith('{"')]  # vLLM logs to stdout too
    return json.loads(line)


def prompt_args() -> list[str]:
    return [a for p in PROMPTS for a in ("--prompt-ids", p)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, family) -> Path:
    architecture, overrides, _ = FAMILIES[family]
    return make_checkpoint(tmp_path_factory.mktemp(family) / "hf", architecture, seed=3, initializer_range=0.15,
                           **{**BASE, **overrides})


@pytest.fixture(scope="module")
def vllm_reference(checkpoint, family) -> tuple[list[list[int]], Path]:
    """vLLM's greedy tokens with its default loader on the source, and vLLM's own TP=2 state of it."""
    saved = checkpoint.parent / "vllm-tp2"
    if FAMILIES[family][2]:
        result = vllm("generate", str(checkpoint), "--tp", str(TP), *prompt_args(), "--dump", str(saved),
                      pythonpath=DUMPPRE)
    else:
        result = vllm("generate", str(checkpoint), "--tp", str(TP), *prompt_args(), "--save", str(saved),
                      pythonpath=KEEPWEIGHTS)
    tokens = result["outputs"]
    assert len({t for seq in tokens for t in seq}) > 3, tokens  # tokens vary: comparing them means something
    return tokens, saved


@pytest.fixture(scope="module")
def converted(checkpoint) -> Path:
    out = checkpoint.parent / "shardstate-tp2"
    convert(checkpoint, out, TP)
    return out


def shardstate_tokens(model_dir: Path) -> list[list[int]]:
    result = subprocess.run(
        [str(BIN / "shardstate"), "generate", str(model_dir), "--tp", str(TP), "--ignore-eos", "--json",
         "--max-new-tokens", "8", *prompt_args()], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [o["token_ids"] for o in json.loads(result.stdout)["outputs"]]


def test_vllm_loads_shardstate_convert_output(vllm_reference, converted, checkpoint):
    tokens, _ = vllm_reference
    loaded = vllm("generate", str(converted), "--tp", str(TP), "--load-format", "sharded_state", *prompt_args())
    assert loaded["outputs"] == tokens
    assert shardstate_tokens(checkpoint) == tokens


def test_shardstate_loads_vllm_saved_state(vllm_reference):
    tokens, saved = vllm_reference
    assert not (saved / "shardstate.json").exists()
    assert shardstate_tokens(saved) == tokens


def test_rank_files_hold_what_vllms_hold(vllm_reference, converted):
    """Key by key: the same names, shapes, dtypes and bytes in shardstate's rank files as in vLLM's (vLLM's
    state is in fp32 like the source, so the values are the source's, sliced the same way)."""
    _, saved = vllm_reference
    problems = rank_file_differences(converted, saved, TP)
    assert not problems, "\n".join(problems)
