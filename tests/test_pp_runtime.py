"""Pipeline parallel at run time: stages pass hidden states point to point and give transformers' greedy
tokens (fp32) at (pp, tp) = (2, 1), (2, 2), (1, 2), from a HF checkpoint (default, sliced) and from PP
states (sharded); a state saved at one (pp, tp) loads at another with exactly the tensors of a direct
`convert` at the running layout (its files read back with safetensors), each rank reading about its own
share; `save --pp` writes what `convert --pp` writes; torchrun with --pp; refusals in one line.

4-rank runs take ~15 s to start on 2 cores: there are two, marked slow (an MoE PP state at (2, 2), a dense
state resharded to (2, 2))."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_maker, transformers_greedy
from rank_files import assert_same_directory, rank_file_differences, rank_tensors, stage_tensors
from shardstate import LLM
from shardstate.convert import convert
from test_families import FAMILIES

BIN = Path(sys.executable).parent
PP_FAMILIES = {
    "llama-tied-3": ("LlamaForCausalLM", {"tie_word_embeddings": True, "num_hidden_layers": 3}),
    "qwen3": FAMILIES["qwen3"],
    "qwen3-moe": FAMILIES["qwen3-moe"],
}
PROMPTS = [[1, 5, 9, 33, 7, 120, 3], [4, 100, 2, 8], [150]]
STEPS = 5
ALIGNED_READ_LIMIT = 1.25  # bytes read per rank / its own share, where saved boxes hold whole target boxes


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, PP_FAMILIES, seed=13)


@pytest.fixture(scope="module")
def reference(family_dir):
    made: dict[str, list[list[int]]] = {}

    def tokens(name: str) -> list[list[int]]:
        if name not in made:
            made[name] = transformers_greedy(family_dir(name), PROMPTS, STEPS)[0]
            assert len({t for seq in made[name] for t in seq}) > 2  # tokens vary: the comparison means something
        return made[name]

    return tokens


def generate(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)]


def assert_loads_as_its_convert(llm: LLM, direct: Path) -> None:
    """Every parameter of every rank equals the direct convert's tensor of that name, bit for bit."""
    for rank, live in enumerate(llm.rank_state_dicts()):
        pp, tp = divmod(rank, llm.tp_size)
        stored = stage_tensors(direct, pp, tp) if llm.pp_size > 1 else rank_tensors(direct, rank)
        assert live and set(live) <= set(stored), rank
        for name, tensor in live.items():
            assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), (rank, name)


def own_share(direct: Path, rank: int, tp: int, pp: int) -> int:
    pattern = f"model-pp-{rank // tp}-tp-{rank % tp}-part-*" if pp > 1 else f"model-rank-{rank}-part-*"
    return sum(p.stat().st_size for p in direct.glob(pattern))


# (1, 2): the reshards on load below check Llama (tied) and Qwen3-MoE there, test_families.py every family
@pytest.mark.parametrize(("name", "pp", "tp", "load_format"), [
    ("llama-tied-3", 2, 1, "sliced"), ("qwen3", 2, 1, "default"), ("qwen3-moe", 2, 1, "sliced"),
])
def test_greedy_tokens_match_transformers_from_a_checkpoint(family_dir, reference, name, pp, tp, load_format):
    with LLM(family_dir(name), tensor_parallel_size=tp, pipeline_parallel_size=pp, load_format=load_format) as llm:
        assert generate(llm) == reference(name)
        assert [r.rank for r in llm.load_reports] == list(range(pp * tp))


@pytest.mark.parametrize("name", ["qwen3", "qwen3-moe"])
def test_a_pp_state_loads_at_its_own_layout(family_dir, reference, tmp_path, name):
    state = tmp_path / "pp2"
    convert(family_dir(name), state, 1, pp_size=2)
    with LLM(state, pipeline_parallel_size=2) as llm:
        assert generate(llm) == reference(name)
        assert [[Path(f).name for f in r.files] for r in llm.load_reports] == [
            ["model-pp-0-tp-0-part-0.safetensors"], ["model-pp-1-tp-0-part-0.safetensors"]]
        assert all(r.resharded_from is None for r in llm.load_reports)
    if name == "qwen3":  # and at PP=1, from the CLI: the report says what it was resharded from
        done = shardstate("generate", str(state), "--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens",
                          str(STEPS), "--ignore-eos")
        assert done.returncode == 0, done.stderr
        assert f"tokens: {reference(name)[0]}" in done.stdout and "resharded on load from TP=1 PP=2" in done.stdout


@pytest.mark.slow
def test_pp2_tp2_from_a_pp_state_matches_transformers(family_dir, reference, tmp_path):
    """An MoE (experts split within each stage); a dense family runs at (2, 2) in the reshards below."""
    state = tmp_path / "pp2tp2"
    convert(family_dir("qwen3-moe"), state, 2, pp_size=2)
    with LLM(state, tensor_parallel_size=2, pipeline_parallel_size=2) as llm:
        assert generate(llm) == reference("qwen3-moe")


RESHARDS = [  # (saved (pp, tp), running (pp, tp), family)
    ((1, 4), (1, 2), "llama-tied-3"),
    ((2, 1), (1, 2), "qwen3-moe"),
    pytest.param((1, 2), (2, 2), "llama-tied-3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("saved", "running", "name"), RESHARDS, ids=lambda v: str(v))
def test_a_state_loads_at_another_layout_as_its_convert(family_dir, reference, tmp_path, saved, running, name):
    """Weights bit-identical to a direct convert at the running layout, transformers' tokens, and bytes read
    per rank near its own share where the saved boxes hold whole running boxes (printed everywhere)."""
    src = family_dir(name)
    convert(src, tmp_path / "saved", saved[1], pp_size=saved[0], max_part_bytes=200_000)
    direct = tmp_path / "direct"
    convert(src, direct, running[1], pp_size=running[0])
    with LLM(tmp_path / "saved", tensor_parallel_size=running[1], pipeline_parallel_size=running[0],
             verify=True) as llm:
        assert_loads_as_its_convert(llm, direct)
        assert generate(llm) == reference(name)
        reports = llm.load_reports
    assert all((r.resharded_from, r.resharded_from_pp) == (saved[1], saved[0]) for r in reports)
    ratios = [r.bytes_read / own_share(direct, r.rank, running[1], running[0]) for r in reports]
    print(f"{name} (pp, tp) {saved} -> {running}: bytes read / own share per rank {[round(x, 3) for x in ratios]}")
    if saved[1] % running[1] == 0:  # each running rank's boxes are whole saved ranks' boxes
        assert all(ratio <= ALIGNED_READ_LIMIT for ratio in ratios), ratios


def test_save_at_pp2_writes_what_convert_writes(family_dir, tmp_path):
    src = family_dir("llama-tied-3")
    with LLM(src, pipeline_parallel_size=2, load_format="sliced") as llm:
        files = llm.save_sharded_state(tmp_path / "saved")
    assert files == convert(src, tmp_path / "direct", 1, pp_size=2).files
    assert_same_directory(tmp_path / "saved", tmp_path / "direct")


def shardstate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, timeout=180)


def test_generate_pp_from_the_cli_and_torchrun(family_dir, reference):
    model = str(family_dir("qwen3"))
    args = ["generate", model, "--prompt-ids", "1,5,9,33,7,120,3", "--max-new-tokens", str(STEPS), "--ignore-eos",
            "--json", "--load-format", "sliced"]
    done = shardstate(*args, "--pp", "2")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [o["token_ids"] for o in doc["outputs"]] == reference("qwen3")[:1]
    assert [r["rank"] for r in doc["load"]] == [0, 1]
    torchrun = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "shardstate"),
         *args, "--pp", "2"], capture_output=True, text=True, timeout=180)
    assert torchrun.returncode == 0, torchrun.stderr
    (line,) = [ln for ln in torchrun.stdout.splitlines() if ln.startswith("{")]  # rank 0 prints, once
    assert json.loads(line)["outputs"] == doc["outputs"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--pp", "3"], "PP size 3 is more than the model's 2 layers: use --pp 2 or less"),
    (["--pp", "2", "--load-format", "scatter"], "--load-format scatter deals the parameters out over all ranks"),
])
def test_run_time_refusals_in_one_line(family_dir, args, expected):
    refused = shardstate("generate", str(family_dir("qwen3")), "--prompt-ids", "1,2", *args)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert expected in refused.stderr


def test_a_state_without_a_manifest_is_not_resharded_across_stages(family_dir, tmp_path):
    from test_sharded import strip_to_vllm_layout

    convert(family_dir("qwen3"), tmp_path / "tp2", 2)
    strip_to_vllm_layout(tmp_path / "tp2")
    refused = shardstate("generate", str(tmp_path / "tp2"), "--tp", "1", "--pp", "2", "--prompt-ids", "1")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "saved for TP=2, running TP=1 PP=2: a directory without shardstate.json (written by vLLM?) records no " \
           "specs to reshard from" in refused.stderr


def test_a_pp_state_in_s3_inspects_loads_and_reshards(server, family_dir, reference, tmp_path, monkeypatch):
    """Uploaded as it is; inspect reads the headers in place; at its own layout each rank fetches its own
    files; at (1, 2) the ranks read their boxes in place, fetching about their share."""
    from conftest import S3_BUCKET
    from shardstate.state_info import inspect_location, verify_location
    from shardstate.store.upload import upload_state

    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    src = family_dir("qwen3-moe")
    convert(src, tmp_path / "pp2", 1, pp_size=2)
    convert(src, tmp_path / "tp2", 2)
    url = f"s3://{S3_BUCKET}/pp/pp2"
    upload_state(tmp_path / "pp2", url)
    info = inspect_location(url, tmp_path / "cache")
    assert info["ok"] and (info["tp_size"], info["pp_size"]) == (1, 2)
    assert [check.ok for check in verify_location(url, tmp_path / "cache-verify")] == [True, True]
    with LLM(url, pipeline_parallel_size=2, cache_dir=tmp_path / "cache") as llm:
        assert generate(llm) == reference("qwen3-moe")
        assert [[Path(f).name for f in r.fetched_files] for r in llm.load_reports] == [
            ["model-pp-0-tp-0-part-0.safetensors"], ["model-pp-1-tp-0-part-0.safetensors"]]
    with LLM(url, tensor_parallel_size=2, cache_dir=tmp_path / "cache2") as llm:
        assert_loads_as_its_convert(llm, tmp_path / "tp2")
        ratios = [r.bytes_fetched / own_share(tmp_path / "tp2", r.rank, 2, 1) for r in llm.load_reports]
    print(f"qwen3-moe (pp, tp) (2, 1) -> (1, 2) from S3: bytes fetched / own share per rank "
          f"{[round(x, 3) for x in ratios]}")
    assert all(ratio <= ALIGNED_READ_LIMIT for ratio in ratios), ratios


def test_a_vllm_written_pp_directory_loads_at_its_layout_only(family_dir, reference, tmp_path):
    """vLLM's save at PP=2 (its model-pp-P-tp-T files, no shardstate metadata, no manifest) loads at PP=2 with
    the strict checks and a warning, and nowhere else."""
    from safetensors.torch import load_file, save_file

    state = tmp_path / "vllm-pp2"
    convert(family_dir("llama-tied-3"), state, 1, pp_size=2)
    (state / "shardstate.json").unlink()
    for path in state.glob("model-pp-*.safetensors"):
        save_file(load_file(path), path)
    with LLM(state, pipeline_parallel_size=2) as llm:
        assert generate(llm) == reference("llama-tied-3")
    refused = shardstate("generate", str(state), "--prompt-ids", "1")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "saved for TP=1 PP=2, running TP=1: a directory without shardstate.json" in refused.stderr
    convert(state, tmp_path / "from-vllm", 2)  # convert reshards it with the model's specs
    convert(family_dir("llama-tied-3"), tmp_path / "direct", 2)
    # the same tensors (the manifests differ: their source is vLLM's files)
    assert rank_file_differences(tmp_path / "from-vllm", tmp_path / "direct", 2) == []


def test_a_pp_size_no_run_can_use_is_refused_before_any_worker(family_dir):
    import os

    from shardstate.errors import ShardstateError

    cores = os.cpu_count() or 1
    with pytest.raises(ShardstateError, match=f"TP x PP = {8 * cores + 2} ranks is more than 4 ranks per CPU core"):
        LLM(family_dir("qwen3"), tensor_parallel_size=1, pipeline_parallel_size=8 * cores + 2)
    with pytest.raises(ShardstateError, match="PP size 0 is not a positive integer: use --pp 1 or more"):
        LLM(family_dir("qwen3"), pipeline_parallel_size=0)
