"""Every model family on random checkpoints made by transformers: logits close to transformers' own model
(fp32) and identical greedy tokens; default, sliced and sharded loads bit-identical; `save` byte-identical
to `convert`; resharding byte-identical to direct converts. No per-family code in the loaders: all of it
goes through the specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_maker, transformers_greedy
from rank_files import assert_same_directory, rank_tensors
from shardstate import LLM
from shardstate.convert import convert
from test_loaders import assert_states_equal

MOE = {"num_experts_per_tok": 2}
QWEN_MOE = {**MOE, "num_experts": 4, "moe_intermediate_size": 32}
FAMILIES = {  # name: (architecture, config overrides); vocab 203, 4 heads / 2 kv heads (GQA) throughout
    "llama-llama3-rope": ("LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral-window-4": ("MistralForCausalLM", {"sliding_window": 4}),
    "qwen2-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3-tied": ("Qwen3ForCausalLM", {"head_dim": 8, "tie_word_embeddings": True}),
    "phi3-window-5": ("Phi3ForCausalLM", {"sliding_window": 5, "pad_token_id": 0, "bos_token_id": 1,
                                          "eos_token_id": 2}),
    "mixtral": ("MixtralForCausalLM", {**MOE, "num_local_experts": 4}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {**QWEN_MOE, "shared_expert_intermediate_size": 48,
                                          "num_hidden_layers": 3, "mlp_only_layers": [1]}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {**QWEN_MOE, "head_dim": 16, "norm_topk_prob": True}),
}
MOE_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe")
PROMPTS = [[1, 5, 9, 33, 7, 120, 3, 4, 5, 6, 40, 41], [4, 100, 2, 8], [150], [11, 12, 13, 14, 15, 16, 17]]
STEPS = 6


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, FAMILIES, seed=3)


def run(model: Path, tp: int, load_format: str) -> tuple[list, list[list[int]], torch.Tensor, LLM]:
    llm = LLM(model, tensor_parallel_size=tp, load_format=load_format)
    outputs = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    return llm.rank_state_dicts(), [o.token_ids for o in outputs], torch.stack([o.logits for o in outputs]), llm


def assert_like_transformers(tokens: list[list[int]], logits: torch.Tensor, model: Path) -> None:
    ref_tokens, ref_logits = transformers_greedy(model, PROMPTS, STEPS)
    assert (logits - ref_logits).abs().max() / ref_logits.abs().max() < 1e-4
    assert tokens == ref_tokens
    assert len({t for seq in tokens for t in seq}) > 3  # greedy tokens vary: the comparison means something


@pytest.mark.parametrize("name", FAMILIES)
def test_family_at_tp2_every_loader_and_save(family_dir, tmp_path, name):
    src = family_dir(name)
    states, tokens, logits, llm = run(src, 2, "default")
    with llm:
        files = llm.save_sharded_state(tmp_path / "saved", max_size=40_000)
    assert_like_transformers(tokens, logits, src)
    direct = convert(src, tmp_path / "direct", 2, max_part_bytes=40_000)
    assert files == direct.files
    assert_same_directory(tmp_path / "saved", tmp_path / "direct")
    for model, load_format in ((src, "sliced"), (src, "scatter"), (tmp_path / "direct", "sharded")):
        other_states, other_tokens, _, other = run(model, 2, load_format)
        reads = [report.bytes_read for report in other.load_reports]
        other.close()
        assert other_tokens == tokens, load_format
        for state, reference in zip(other_states, states, strict=True):
            assert_states_equal(state, reference)
        if load_format == "scatter":  # the checkpoint read once across the ranks, not once per rank
            weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            assert sum(reads) < 1.05 * weights and max(reads) < 0.8 * weights, (reads, weights)  # + headers


@pytest.mark.slow
def test_scatter_at_tp4_equals_convert_and_transformers(family_dir, tmp_path):
    """Four ranks deal out an MoE with a shared expert (experts stacked, padded vocabulary): every rank's
    parameters equal the TP=4 convert's tensors, and its tokens transformers' (one 4-rank start serves both:
    the other MoE families at TP=4 below)."""
    src = family_dir("qwen2-moe")
    convert(src, tmp_path / "tp4", 4)
    states, tokens, logits, llm = run(src, 4, "scatter")
    llm.close()
    for rank, state in enumerate(states):
        stored = rank_tensors(tmp_path / "tp4", rank)
        assert state and set(state) <= set(stored), rank
        for name, tensor in state.items():
            assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), (rank, name)
    assert_like_transformers(tokens, logits, src)


@pytest.mark.parametrize("name,tp", [(name, 1) for name in FAMILIES] + [
    pytest.param(name, 4, marks=pytest.mark.slow) for name in MOE_FAMILIES if name != "qwen2-moe"])
def test_family_matches_transformers(family_dir, tmp_path, name, tp):
    src = family_dir(name)
    convert(src, tmp_path / "sharded", tp)
    _, tokens, logits, llm = run(tmp_path / "sharded", tp, "sharded")
    llm.close()
    assert_like_transformers(tokens, logits, src)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_reshard_equals_direct_convert(family_dir, tmp_path, name):
    """2 -> 4 and 4 -> 1 without the HF checkpoint: byte-identical to converting it directly (experts,
    fused sources, biases, q/k norms and replicated kv heads merged and cut again)."""
    src = family_dir(name)
    convert(src, tmp_path / "tp2", 2, max_part_bytes=50_000)
    for saved, target in (("tp2", 4), (f"re{4}", 1)):
        resharded = convert(tmp_path / saved, tmp_path / f"re{target}", target, max_part_bytes=50_000)
        direct = convert(src, tmp_path / f"direct{target}", target, max_part_bytes=50_000)
        assert resharded.files == direct.files
        assert_same_directory(tmp_path / f"re{target}", tmp_path / f"direct{target}")
        manifest = json.loads((tmp_path / f"re{target}" / "shardstate.json").read_text())
        assert manifest["architecture"] == FAMILIES[name][0]


def write_config(directory: Path, architecture: str, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    base = {"architectures": [architecture], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (directory / "config.json").write_text(json.dumps({**base, **fields}))
    return directory


def test_family_defaults_follow_transformers(tmp_path):
    from shardstate.models import load_config

    assert load_config(write_config(tmp_path / "q3", "Qwen3ForCausalLM")).head_dim == 128
    assert load_config(write_config(tmp_path / "q3m", "Qwen3MoeForCausalLM")).head_dim == 16
    assert load_config(write_config(tmp_path / "q2", "Qwen2ForCausalLM")).head_dim == 16
    mixtral = load_config(write_config(tmp_path / "mx", "MixtralForCausalLM", num_local_experts=4))
    assert (mixtral.rope.theta, mixtral.rms_norm_eps) == (1e6, 1e-5)
    assert (mixtral.moe.top_k, mixtral.moe.norm_topk_prob) == (2, True)
    assert load_config(write_config(tmp_path / "mi", "MistralForCausalLM")).sliding_window == 4096
    assert load_config(write_config(tmp_path / "p3", "Phi3ForCausalLM")).rms_norm_eps == 1e-5
    kv_default = write_config(tmp_path / "kv", "Qwen3MoeForCausalLM")
    config = json.loads((kv_default / "config.json").read_text())
    del config["num_key_value_heads"]
    (kv_default / "config.json").write_text(json.dumps(config))
    assert load_config(kv_default).num_key_value_heads == 4
    moe = load_config(write_config(tmp_path / "q2m", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, decoder_sparse_step=2, num_hidden_layers=4,
                                   mlp_only_layers=[3])).moe
    assert moe.dense_layers == {0, 2, 3} and moe.shared_intermediate_size == 5632  # transformers' default


@pytest.mark.parametrize("architecture,fields,expected", [
    ("Phi3ForCausalLM", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "RoPE scaling 'longrope' is not supported yet"),
    ("LlamaForCausalLM", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
    ("Phi3ForCausalLM", {"rope_parameters": {"partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True}, "'use_sliding_window': true is not supported yet"),
    ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 5, "moe_intermediate_size": 8},
     "'num_experts_per_tok' is 5, above"),
    ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                             "mlp_only_layers": [7]},
     "'mlp_only_layers' is [7], not a list of layer indices"),
    ("MistralForCausalLM", {"sliding_window": -1}, "'sliding_window' is -1"),
    ("GPT2LMHeadModel", {}, "unsupported architecture 'GPT2LMHeadModel'"),
    ("", {"architectures": [["LlamaForCausalLM"]]}, "unsupported architecture None"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                          "rope_scaling": {"type": "linear", "factor": 4.0}},
     "'rope_parameters' and 'rope_scaling' disagree"),
    ("Phi3ForCausalLM", {"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
     "linear RoPE has no 'factor'"),
    ("LlamaForCausalLM", {"rope_parameters": 0}, "'rope_parameters' is 0, not an object"),
    ("Qwen2MoeForCausalLM", {"mlp_only_layers": False}, "'mlp_only_layers' is False, not a list"),
])
def test_family_configs_it_cannot_run_are_refused_in_one_line(tmp_path, architecture, fields, expected):
    directory = write_config(tmp_path / "m", architecture, **fields)
    result = subprocess.run([sys.executable, "-m", "shardstate.command", "convert", str(directory),
                             str(tmp_path / "out"), "--tp", "1"], capture_output=True, text=True, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
