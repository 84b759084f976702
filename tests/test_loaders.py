"""The default and sliced loaders: bit-identical parameters, equal to slices computed here by hand from
the checkpoint (read with the safetensors library), and the sliced loader reads only its slices (whole rows
of a column slice, in a few large reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS
from shardstate import LLM
from shardstate.format.checkpoint import open_checkpoint
from shardstate.io.reader import ReadAccount
from shardstate.loaders.boxes import read_boxes
from shardstate.spec import Copy, cut


def hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def expected_rank_state(model_dir: Path, tp: int, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """vLLM's rank-local Llama layout, written out directly (independent of shardstate.spec)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hf = {k: v.to(dtype) for k, v in hf_state(model_dir).items()}
    kv_chunks = min(tp, cfg["num_key_value_heads"])
    kv_index = rank * kv_chunks // tp

    def vocab_rows(weight: torch.Tensor) -> torch.Tensor:
        padded_rows = -(-weight.shape[0] // 64) * 64
        padded = torch.zeros(padded_rows, weight.shape[1], dtype=weight.dtype)
        padded[: weight.shape[0]] = weight
        return padded.chunk(tp)[rank]

    tied = cfg.get("tie_word_embeddings")  # vLLM's name for the tied weight: lm_head.weight
    out = {"lm_head.weight" if tied else "model.embed_tokens.weight": vocab_rows(hf["model.embed_tokens.weight"])}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        q, k, v = (hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
        out[f"{p}self_attn.qkv_proj.weight"] = torch.cat(
            [q.chunk(tp)[rank], k.chunk(kv_chunks)[kv_index], v.chunk(kv_chunks)[kv_index]]
        )
        out[f"{p}self_attn.o_proj.weight"] = hf[f"{p}self_attn.o_proj.weight"].chunk(tp, dim=1)[rank]
        gate, up = hf[f"{p}mlp.gate_proj.weight"], hf[f"{p}mlp.up_proj.weight"]
        out[f"{p}mlp.gate_up_proj.weight"] = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
        out[f"{p}mlp.down_proj.weight"] = hf[f"{p}mlp.down_proj.weight"].chunk(tp, dim=1)[rank]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = hf[f"{p}{norm}.weight"]
    out["model.norm.weight"] = hf["model.norm.weight"]
    if not tied:
        out["lm_head.weight"] = vocab_rows(hf["lm_head.weight"])
    return out


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


def load_both(model_dir: Path, tp: int, **kwargs):
    results = {}
    for load_format in ("default", "sliced"):
        with LLM(model_dir, tensor_parallel_size=tp, load_format=load_format, **kwargs) as llm:
            tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
            results[load_format] = (llm.rank_state_dicts(), llm.load_reports, tokens)
    return results


@pytest.mark.parametrize(
    "name,tp",
    [("gqa_untied", 2), ("mha_tied", 2), pytest.param("gqa_untied", 4, marks=pytest.mark.slow)],
    ids=["gqa_untied-tp2", "mha_tied-tp2", "gqa_untied-tp4-kv-replicated"],
)
def test_loaders_bit_identical_to_hand_slices(checkpoints, name, tp):
    model_dir = checkpoints[name]
    results = load_both(model_dir, tp)
    for states, _, _ in results.values():
        for rank, state in enumerate(states):
            expected = expected_rank_state(model_dir, tp, rank, torch.float32)
            assert_states_equal(state, expected)
    assert results["default"][2] == results["sliced"][2]


def test_sliced_reads_only_its_slices(checkpoints):
    """TP=2: default reads every byte of the file on every rank; sliced ranks together read the file
    once, plus per extra rank the header, the replicated norms and the column-sliced tensors (whole rows)."""
    model_dir = checkpoints["gqa_untied"]
    (file,) = model_dir.glob("*.safetensors")
    file_size = file.stat().st_size
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    whole_on_each = sum(t.numel() * t.element_size() for k, t in hf_state(model_dir).items()
                        if "norm" in k or "o_proj" in k or "down_proj" in k)
    results = load_both(model_dir, 2)
    default_reports, sliced_reports = results["default"][1], results["sliced"][1]
    assert [r.bytes_read for r in default_reports] == [file_size, file_size]
    sliced = [r.bytes_read for r in sliced_reports]
    assert sum(sliced) == file_size + header + whole_on_each
    for bytes_read in sliced:
        assert 0.4 * file_size < bytes_read < 0.75 * file_size
    for report in default_reports + sliced_reports:
        assert report.files == [str(file)]
        assert report.seconds > 0


def test_multi_file_bf16_checkpoint_and_dtype_cast(sharded_bf16_checkpoint):
    model_dir = sharded_bf16_checkpoint
    files = sorted(model_dir.glob("*.safetensors"))
    assert len(files) > 2 and (model_dir / "model.safetensors.index.json").is_file()
    native = load_both(model_dir, 2)
    for states, reports, _ in native.values():
        for rank, state in enumerate(states):
            assert_states_equal(state, expected_rank_state(model_dir, 2, rank, torch.bfloat16))
        assert all(r.bytes_read > 0 for r in reports)
    assert native["default"][2] == native["sliced"][2]
    cast = load_both(model_dir, 2, dtype="float32")
    for states, _, _ in cast.values():
        for rank, state in enumerate(states):
            assert_states_equal(state, expected_rank_state(model_dir, 2, rank, torch.float32))


@pytest.mark.parametrize("window_rows", [1, 3, 1000])
def test_column_boxes_read_in_whole_rows_equal_their_slices(tmp_path, window_rows):
    """Boxes cut from whole rows read `window` bytes at a time (a window of one row, of rows that do not
    divide the box, of the whole tensor) equal the tensor's slices, cast into another dtype too; beside them
    boxes read run by run (whole rows; rows wider than the window)."""
    stored = {"w2": torch.randn(4, 7, 10).to(torch.bfloat16), "wide": torch.randn(3, 40000).to(torch.bfloat16)}
    save_file(stored, tmp_path / "model.safetensors")
    boxes = [("w2", ((0, 4), (2, 3), (0, 10))), ("w2", ((1, 3), (0, 7), (5, 5))), ("w2", ((2, 2), (0, 7), (0, 10))),
             ("wide", ((0, 3), (0, 20000)))]  # column, inner, whole rows, wide rows
    with ReadAccount() as account:
        tensors = open_checkpoint(tmp_path, account).tensors
        for dtype in (torch.bfloat16, torch.float32):
            plan, expected = [], []
            for name, box in boxes:
                dest = torch.empty([length for _, length in box], dtype=dtype)
                copy = Copy(name, box, tuple((0, length) for _, length in box))
                plan.append((tensors[name], dest, copy))
                expected.append(cut(stored[name], box).to(dtype))
            read_boxes(plan, account, window=window_rows * 7 * 10 * 2)
            for (_, dest, _), want in zip(plan, expected, strict=True):
                assert torch.equal(dest, want)
