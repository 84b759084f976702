"""Pipeline-parallel states between shardstate and vLLM 0.32 (CPU build), at pipeline_parallel_size=2,
tensor_parallel_size=1 (two ranks, one core each: all this machine has). Run by `make test-vllm`.

Per family, vLLM runs four times: its default loader at PP=1 (the reference tokens); its default loader at
PP=2 with peers/vllm-dumppre (its own PP=2 state as loaded, written by its ShardedStateLoader.save_model
before the CPU backend repacks weights), then generating; its `sharded_state` loader on shardstate's
`convert --pp 2 --tp 1` output as vLLM runs it by itself, and again generating.

vLLM 0.32's CPU build cannot generate at PP > 1 by itself: a later stage's buffer for the hidden states it
receives (`intermediate_tensors`) is allocated by the warmup run, which the CPU worker skips with
enforce_eager and an explicit KV cache size, so the first step fails with an AssertionError in
`sync_and_gather_intermediate_tensors`, after both stages loaded their weights. vllm_peer's `--pp-buffers`
allocates that buffer before generating, as the warmup would (weights untouched); the runs that generate at
PP=2 use it, and their tokens must equal the PP=1 default loader's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from rank_files import rank_file_differences, stage_tensors
from shardstate.convert import convert
from shardstate.synthetic import make_checkpoint
from test_vllm_interop import BASE, DUMPPRE, FAMILIES, PEER, prompt_args, vllm

pytestmark = pytest.mark.vllm
BIN = Path(sys.executable).parent
PP = 2
# Llama tied (vLLM keeps the tied head as lm_head.weight on the last stage, the embedding on the first) and
# Qwen2-MoE (3 layers split [2, 1]; vLLM builds its embedding, norm and head on every stage)
PP_FAMILIES = ["llama-tied", "qwen2-moe"]


@pytest.fixture(scope="module", params=PP_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, family) -> Path:
    architecture, overrides, _ = FAMILIES[family]
    return make_checkpoint(tmp_path_factory.mktemp(f"pp-{family}") / "hf", architecture, seed=3,
                           initializer_range=0.15, **{**BASE, **overrides})


@pytest.fixture(scope="module")
def vllm_tokens(checkpoint) -> list[list[int]]:
    """vLLM's greedy tokens with its default loader at PP=1 (TP=1)."""
    tokens = vllm("generate", str(checkpoint), *prompt_args())["outputs"]
    assert len({t for seq in tokens for t in seq}) > 3, tokens  # tokens vary: comparing them means something
    return tokens


@pytest.fixture(scope="module")
def vllm_pp_dump(checkpoint) -> tuple[Path, list[list[int]] | str]:
    """vLLM's own PP=2 state (dumppre, with the source's non-weight files: both written while the engine
    starts), and its default loader's tokens at PP=2 with --pp-buffers (or the end of its log, if it failed)."""
    dump = checkpoint.parent / "vllm-pp2"
    result = peer("generate", str(checkpoint), "--pp", str(PP), "--pp-buffers", *prompt_args(), "--dump", str(dump),
                  pythonpath=DUMPPRE)
    assert (dump / "config.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    if result.returncode != 0:
        return dump, result.stderr[-3000:]
    out = json_line(result.stdout)
    assert out["pp_buffers"] == [False, True]  # the last stage's buffer only
    return dump, out["outputs"]


@pytest.fixture(scope="module")
def converted(checkpoint) -> Path:
    out = checkpoint.parent / "shardstate-pp2-tp1"
    convert(checkpoint, out, 1, pp_size=PP, show_progress=False)
    return out


def peer(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """vllm_peer.py as `vllm()` runs it, whatever its exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(PEER), *args], capture_output=True, text=True, timeout=300, env=env)


def json_line(stdout: str) -> dict:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith('{"')]  # vLLM logs to stdout too
    return json.loads(line)


def shardstate_tokens(model_dir: Path, pp: int) -> list[list[int]]:
    result = subprocess.run(
        [str(BIN / "shardstate"), "generate", str(model_dir), "--tp", "1", "--pp", str(pp), "--ignore-eos",
         "--json", "--max-new-tokens", "8", *prompt_args()], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [o["token_ids"] for o in json.loads(result.stdout)["outputs"]]


def weight_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.safetensors"))


def test_pp_files_equal_vllms_own_pp_state(vllm_pp_dump, converted):
    """Stage by stage, key by key: the same file names, keys, shapes, dtypes and bytes in shardstate's
    `convert --pp 2 --tp 1` output as in vLLM's own PP=2 state as loaded."""
    dump, _ = vllm_pp_dump
    assert weight_files(dump) == weight_files(converted) == [f"model-pp-{s}-tp-0-part-0.safetensors" for s in range(PP)]
    problems = rank_file_differences(converted, dump, 1, pp=PP)
    assert not problems, "\n".join(problems)
    for stage in range(PP):
        print(f"pp {stage} tp 0: {len(stage_tensors(dump, stage, 0))} tensors, all equal to vLLM's")


def test_vllm_sharded_state_loads_pp_files_then_fails_at_the_first_step(converted, vllm_tokens):
    """vLLM as it runs by itself at PP=2: `sharded_state` loads shardstate's files on both stages (a missing key
    raises "Missing keys", an extra one a KeyError, a shape or dtype mismatch warns), then the first step fails
    in vLLM's CPU runner. Should a vLLM generate here, its tokens must be the default loader's."""
    result = peer("generate", str(converted), "--pp", str(PP), "--load-format", "sharded_state", *prompt_args())
    log = result.stdout + result.stderr
    for bad in ("Missing keys", "loading tensor of shape", "Attempted to load weight",
                "Could not find checkpoint files"):
        assert bad not in log, log[-3000:]
    assert not re.search(r"KeyError: '[^']*\.", log), log[-3000:]  # a weight name (not a request id)
    # "Loading weights took" is logged by the first rank only; every stage's load returned once the engine is
    # up (prompts processed), and each stage then sized its KV cache
    assert re.search(r"\(Worker_PP0[^)]*\).*Loading weights took", log), log[-3000:]
    assert "Processed prompts" in log, log[-3000:]
    loaded = sorted(set(re.findall(r"\((Worker_PP\d)[^)]*\).* for KV cache", log)))
    assert loaded == [f"Worker_PP{s}" for s in range(PP)], log[-3000:]
    if result.returncode == 0:
        assert json_line(result.stdout)["outputs"] == vllm_tokens
        print("vLLM generated at PP=2 by itself, with the tokens of its default loader")
    else:
        assert re.search(r"\(Worker_PP1[^)]*\).*AssertionError", log), log[-3000:]
        assert "sync_and_gather_intermediate_tensors" in log and "assert self.intermediate_tensors" in log
        print(f"vLLM loaded on both stages ({', '.join(loaded)}), then failed at the first step: Worker_PP1 "
              "AssertionError in sync_and_gather_intermediate_tensors (assert self.intermediate_tensors is not None)")


def test_vllm_sharded_state_at_pp2_gives_the_default_loaders_tokens(converted, vllm_tokens, vllm_pp_dump):
    """With the later stage's hidden-state buffer allocated (--pp-buffers), vLLM generates at PP=2: its
    `sharded_state` loader on shardstate's files gives the tokens of its default loader, at PP=2 and PP=1."""
    _, auto_pp2 = vllm_pp_dump
    assert not isinstance(auto_pp2, str), f"vLLM's default loader did not generate at PP=2:\n{auto_pp2}"
    assert auto_pp2 == vllm_tokens
    result = vllm("generate", str(converted), "--pp", str(PP), "--pp-buffers", "--load-format", "sharded_state",
                  *prompt_args())
    assert result["outputs"] == vllm_tokens


def test_shardstate_loads_vllms_own_pp_state(vllm_pp_dump, vllm_tokens, checkpoint, converted):
    """`shardstate generate` at TP=1 PP=2 on vLLM's own PP=2 state (no manifest: vLLM's file names) gives vLLM's
    tokens, as it does on the source checkpoint and on its own PP=2 files."""
    dump, _ = vllm_pp_dump
    assert not (dump / "shardstate.json").exists()
    assert shardstate_tokens(dump, PP) == vllm_tokens
    assert shardstate_tokens(converted, PP) == vllm_tokens
    assert shardstate_tokens(checkpoint, PP) == vllm_tokens
