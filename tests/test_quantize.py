"""`--quantize int8|fp8` after load, against an independent reference: the test quantizes and dequantizes the
checkpoint's linear weights itself (per output channel, over the whole row), loads them into transformers'
own model, and shardstate's quantized run (fp32 compute) must give the same greedy tokens and close logits,
whatever the TP size (row-parallel ranks agree on whole-row scales)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import checkpoint_maker, transformers_greedy
from quant_reference import KEPT, fake_quantized
from rank_files import assert_same_directory, rank_tensors
from shardstate import LLM
from shardstate.convert import convert

PROMPTS = [[1, 5, 9, 33, 7, 120, 3, 4], [4, 100, 2, 8], [150]]
STEPS = 6
FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 48}),
}


def reference_checkpoint(src: Path, out: Path, method: str) -> Path:
    out.mkdir()
    for file in src.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            save_file({name: t if t.dim() != 2 or any(k in name for k in KEPT) else fake_quantized(t, method)
                       for name, t in tensors.items()}, out / file.name, metadata={"format": "pt"})
        else:
            (out / file.name).write_bytes(file.read_bytes())
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, FAMILIES, seed=4)


@pytest.mark.parametrize("name,tp,method", [
    *((name, tp, method) for name, tp in (("llama", 1), ("llama", 2), ("qwen2-moe", 2)) for method in ("int8", "fp8")),
    pytest.param("qwen2-moe", 4, "fp8", marks=pytest.mark.slow),  # one 4-rank start: the scales' all-reduce
])
def test_quantized_generate_matches_a_hand_quantized_transformers_model(checkpoint, tmp_path, name, tp, method):
    """At TP=4 the save is also checked: row-parallel ranks hold a quarter of each row, and their all-reduced
    maxima give the scales of the whole row, so the saved bytes are the offline converter's."""
    src = checkpoint(name)
    ref_tokens, ref_logits = transformers_greedy(reference_checkpoint(src, tmp_path / "ref", method), PROMPTS, STEPS)
    _, plain_logits = transformers_greedy(src, PROMPTS, STEPS)
    with LLM(src, tensor_parallel_size=tp, load_format="sliced", quantize=method) as llm:
        outputs = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
        state = llm.rank_state_dicts()[0]
        if tp == 4:
            llm.save_sharded_state(tmp_path / "saved", max_size=30_000)
    if tp == 4:
        convert(src, tmp_path / "direct", 4, max_part_bytes=30_000, quantize=method)
        assert_same_directory(tmp_path / "saved", tmp_path / "direct")
    logits = torch.stack([o.logits for o in outputs])
    assert (logits - ref_logits).abs().max() / ref_logits.abs().max() < 1e-4
    assert [o.token_ids for o in outputs] == ref_tokens
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert state[qkv].dtype == (torch.int8 if method == "int8" else torch.float8_e4m3fn)
    assert state[qkv + "_scale"].dtype == torch.float32 and state[qkv + "_scale"].shape == (state[qkv].shape[0], 1)
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    # quantizing moved the logits far beyond the tolerance: the comparison has teeth
    assert (logits - plain_logits).abs().max() / ref_logits.abs().max() > 1e-3


def test_quantize_cli_and_refusals(checkpoint, tmp_path):
    src = checkpoint("llama")
    bin_dir = Path(sys.executable).parent
    ok = subprocess.run([bin_dir / "shardstate", "generate", str(src), "--tp", "2", "--quantize", "int8",
                         "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["outputs"][0]["token_ids"]) == 3
    bad = subprocess.run([bin_dir / "shardstate", "generate", str(src), "--quantize", "int4", "--prompt-ids", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_states_save_convert_reshard_and_load_agree(checkpoint, tmp_path, method):
    """The seed's flow (load, quantize on the workers, each rank saves) writes the directory of an offline
    `convert --quantize`, byte for byte; resharding the quantized state 2 -> 4 -> 2 -> 1 writes the
    directory of a direct convert at that TP; loading it runs the quantized model with the tokens of
    quantize-after-load."""
    src = checkpoint("qwen2-moe")
    with LLM(src, tensor_parallel_size=2, load_format="sliced", quantize=method) as llm:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)]
        llm.save_sharded_state(tmp_path / "saved2", max_size=30_000)
    for tp in (2, 4, 1):
        convert(src, tmp_path / f"direct{tp}", tp, max_part_bytes=30_000, quantize=method)
    assert_same_directory(tmp_path / "saved2", tmp_path / "direct2")
    convert(tmp_path / "saved2", tmp_path / "re4", 4, max_part_bytes=30_000)
    convert(tmp_path / "re4", tmp_path / "re2", 2, max_part_bytes=30_000)
    convert(tmp_path / "re2", tmp_path / "re1", 1, max_part_bytes=30_000)
    for tp in (4, 2, 1):
        assert_same_directory(tmp_path / f"re{tp}", tmp_path / f"direct{tp}")
    manifest = json.loads((tmp_path / "re1" / "shardstate.json").read_text())
    assert manifest["quantization"] == {"method": method, "scales": "per-output-channel"}
    assert {r["dtype"] for r in manifest["tensors"]["0"].values()} == {"F32", "I8" if method == "int8" else "F8_E4M3"}
    quantized_bytes = sum(f["size"] for f in manifest["files"].values())
    plain = convert(src, tmp_path / "plain1", 1)
    assert quantized_bytes < 0.5 * sum((tmp_path / "plain1" / f).stat().st_size for f in plain.files)
    with LLM(tmp_path / "re2", tensor_parallel_size=2) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)] == tokens
        assert llm.load_reports[0].files[0].startswith(str(tmp_path / "re2" / "model-rank-0-part-"))


def test_a_quantized_state_refuses_what_it_cannot_honour(checkpoint, tmp_path):
    src = checkpoint("llama")
    convert(src, tmp_path / "q", 2, quantize="int8")
    bin_dir = Path(sys.executable).parent

    def shardstate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([bin_dir / "shardstate", *args], capture_output=True, text=True)

    for args, expected in (
        (["generate", str(tmp_path / "q"), "--tp", "2", "--quantize", "fp8", "--prompt-ids", "1"],
         "the state is quantized with int8; --quantize fp8 would quantize it twice"),
        (["convert", str(tmp_path / "q"), str(tmp_path / "bf16"), "--tp", "1", "--dtype", "bfloat16"],
         "the state is quantized; its other tensors stay F32"),
        (["generate", str(tmp_path / "q"), "--tp", "2", "--dtype", "bfloat16", "--prompt-ids", "1"],
         "saved as F32, running BF16"),
    ):
        result = shardstate(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert not (tmp_path / "bf16").exists()
    assert shardstate("verify", str(tmp_path / "q")).returncode == 0
    inspected = shardstate("inspect", str(tmp_path / "q"), "--json")
    assert json.loads(inspected.stdout)["quantization"] == {"method": "int8", "scales": "per-output-channel"}
    same = shardstate("generate", str(tmp_path / "q"), "--tp", "2", "--quantize", "int8", "--prompt-ids", "1,2")
    assert same.returncode == 0, same.stderr


def test_quantizing_after_a_sharded_load_frees_the_load_buffer(checkpoint, tmp_path):
    """The sharded loader's parameters are views of one read buffer; after quantizing, no parameter keeps
    a bigger storage alive (the unquantized weights' bytes are gone)."""
    from shardstate.loaders import load_weights
    from shardstate.models import open_model
    from shardstate.parallel.distributed import TPGroup
    from shardstate.parallel.layers import materialize
    from shardstate.quant.apply import quantize_linear_weights
    from shardstate.quant.methods import method_named

    convert(checkpoint("llama"), tmp_path / "tp1", 1)
    model = open_model(tmp_path / "tp1")
    rank_model = model.build_on_meta(TPGroup(0, 1))
    materialize(rank_model, torch.device("cpu"))
    load_weights("sharded", rank_model, model.directory, 0)
    assert any(p.untyped_storage().nbytes() > p.numel() * p.element_size() for p in rank_model.parameters())
    quantize_linear_weights(rank_model, method_named("int8"), TPGroup(0, 1))
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in rank_model.parameters())


def test_a_quantized_state_for_vllm(checkpoint, tmp_path):
    """`--for-vllm`: config.json gains the compressed-tensors quantization_config vLLM needs (W8A8 on channel
    weights; the unquantized linear layers ignored) and each attention layer vLLM's KV-cache placeholders;
    the weights are those of a plain quantized state; save writes what convert does; a reshard keeps it."""
    src = checkpoint("qwen2-moe")
    convert(src, tmp_path / "plain", 2, quantize="int8")
    convert(src, tmp_path / "vllm", 2, quantize="int8", for_vllm=True)
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    quantization = config.pop("quantization_config")
    assert config == json.loads((src / "config.json").read_text())
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    assert quantization == {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {**int8, "strategy": "channel", "dynamic": False},
                                      "input_activations": {**int8, "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head", r"re:model\.layers\.\d+\.mlp\.experts\._shared_experts\._layer\.expert_gate$",
                   r"re:model\.layers\.\d+\.mlp\.gate$"],  # vLLM 0.32's names of the shared-expert gate, router
    }
    manifest = json.loads((tmp_path / "vllm" / "shardstate.json").read_text())
    assert manifest["config_sha256"] == hashlib.sha256((tmp_path / "vllm" / "config.json").read_bytes()).hexdigest()
    for rank in range(2):
        plain, ours = rank_tensors(tmp_path / "plain", rank), rank_tensors(tmp_path / "vllm", rank)
        extra = {k: ours.pop(k) for k in set(ours) - set(plain)}
        placeholders = ("q_scale", "k_scale", "v_scale", "q_zero_point", "k_zero_point", "v_zero_point")
        assert set(extra) == {f"model.layers.{n}.self_attn.attn.{s}" for n in range(2) for s in placeholders}
        for name, tensor in extra.items():
            assert tensor.dtype == torch.float32 and tensor.tolist() == [0.0 if "zero" in name else 1.0]
        assert ours.keys() == plain.keys() and all(ours[k].view(-1).view(torch.uint8).equal(
            plain[k].view(-1).view(torch.uint8)) for k in ours)
    with LLM(src, tensor_parallel_size=2, quantize="int8") as llm:
        llm.save_sharded_state(tmp_path / "saved", for_vllm=True)
    assert_same_directory(tmp_path / "saved", tmp_path / "vllm")
    convert(tmp_path / "vllm", tmp_path / "re1", 1)
    assert (tmp_path / "re1" / "config.json").read_bytes() == (tmp_path / "vllm" / "config.json").read_bytes()
    assert "model.layers.1.self_attn.attn.v_zero_point" in rank_tensors(tmp_path / "re1", 0)
    with LLM(tmp_path / "re1", tensor_parallel_size=1) as a, LLM(tmp_path / "plain", tensor_parallel_size=2) as b:
        assert ([o.token_ids for o in a.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)]
                == [o.token_ids for o in b.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)])


def test_for_vllm_and_quantized_checkpoints_refused(checkpoint, tmp_path):
    src = checkpoint("llama")
    prequantized = tmp_path / "fp8-hf"
    prequantized.mkdir()
    for file in src.iterdir():
        (prequantized / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (prequantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    bin_dir = Path(sys.executable).parent
    for args, expected in (
        (["convert", str(src), str(tmp_path / "out"), "--tp", "2", "--for-vllm"], "--for-vllm is for quantized states"),
        (["convert", str(prequantized), str(tmp_path / "out"), "--tp", "2", "--quantize", "int8"],
         "config.json declares a quantization_config ('fp8')"),
    ):
        result = subprocess.run([bin_dir / "shardstate", *args], capture_output=True, text=True)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_linear_equals_the_dequantized_weights_product(dtype):
    """`linear` never materialises the dequantized weight; it must still give x @ (q * s).T: for int8 and
    fp8, input dims that torch's int8 kernel handles and ones it gets wrong in bf16 (K % 16 != 0), one
    token and several, and fp16 activations large enough that the unscaled product would overflow."""
    from shardstate.parallel.layers import linear
    from shardstate.quant.methods import METHODS, row_absmax

    torch.manual_seed(0)
    for method in ("int8", "fp8"):
        for k in (24, 64, 4096):
            weight = torch.randn(48, k) * 0.02
            scale = METHODS[method].scales(row_absmax(weight))
            q = METHODS[method].quantize(weight, scale)
            for m in (1, 5):
                x = (torch.randn(2, m, k) * (20 if dtype == torch.float16 else 1)).to(dtype)
                bias = torch.randn(48).to(dtype)
                expected = (x.float() @ (q.float() * scale).T + bias.float())
                got = linear(x, q, scale, bias)
                assert got.dtype == dtype and got.shape == (2, m, 48) and torch.isfinite(got).all()
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max(), (method, k, m)
