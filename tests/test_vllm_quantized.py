"""vLLM loads shardstate's quantized states (`convert --quantize M --for-vllm`, run by `make test-vllm`).

The reference is independent of shardstate's quant/: the test quantizes the source checkpoint itself
(tests/quant_reference.py) into a standard compressed-tensors checkpoint, which vLLM loads with its default
loader (its tokens, and its own TP=2 state dumped right after loading). shardstate's state must hold exactly
vLLM's state, key by key and byte by byte, and vLLM's `sharded_state` loader on it must give the tokens of the
default loader. vLLM's CPU build computes W8A8 (it quantizes activations per token; it has no weight-only
kernel for this layout), shardstate dequantizes weights: their tokens agree only partly, and the test
prints how much."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch
from safetensors.torch import load_file, save_file

from quant_reference import KEPT, quantized_rows
from rank_files import rank_file_differences
from shardstate.convert import convert
from shardstate.synthetic import make_checkpoint
from test_vllm_interop import BASE, DUMPPRE, FAMILIES, TP, prompt_args, shardstate_tokens, vllm

pytestmark = pytest.mark.vllm
# vLLM's CPU build runs per-channel W8A8 for dense layers in int8 and fp8, for MoE experts in int8 only
# ("Unsupported FP8 MoE backend: NONE" for channel-wise fp8 experts).
CASES = {"llama-int8": ("llama", "int8"), "llama-fp8": ("llama", "fp8"), "mixtral-int8": ("mixtral", "int8"),
         "qwen2-moe-int8": ("qwen2-moe", "int8")}
NUMBER_TYPE = {"int8": "int", "fp8": "float"}


def compressed_tensors_checkpoint(src: Path, out: Path, method: str) -> Path:
    """The source as a bf16 compressed-tensors checkpoint: every linear weight [N, K] quantized per channel
    (`weight` + `weight_scale` [N, 1] F32), the rest cast to bf16; W8A8 declared (what vLLM's CPU build runs)."""
    out.mkdir()
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (out / file.name).write_bytes(file.read_bytes())
            continue
        tensors = {}
        for name, tensor in load_file(file).items():
            tensor = tensor.to(torch.bfloat16)
            if tensor.dim() == 2 and not any(k in name for k in KEPT):
                tensors[name], tensors[f"{name}_scale"] = quantized_rows(tensor.float(), method)
            else:
                tensors[name] = tensor
        save_file(tensors, out / file.name, metadata={"format": "pt"})
    scheme = {"num_bits": 8, "type": NUMBER_TYPE[method], "symmetric": True}
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": f"{NUMBER_TYPE[method]}-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {**scheme, "strategy": "channel", "dynamic": False},
                                      "input_activations": {**scheme, "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head", "re:.*block_sparse_moe\\.gate$", "re:.*mlp\\.gate$", "re:.*expert_gate$"],  # routers
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))
    return f"{same}/{sum(len(p) for p in a)}"


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_loads_a_quantized_state(case, tmp_path):
    family, method = CASES[case]
    architecture, overrides, _ = FAMILIES[family]
    src = make_checkpoint(tmp_path / "hf", architecture, seed=3, initializer_range=0.15, **{**BASE, **overrides})
    reference = compressed_tensors_checkpoint(src, tmp_path / "ct", method)
    ours = tmp_path / "ours"
    convert(src, ours, TP, dtype="bfloat16", quantize=method, for_vllm=True)

    default = vllm("generate", str(reference), "--tp", str(TP), "--dtype", "bfloat16", *prompt_args(),
                   "--dump", str(tmp_path / "vllm-state"), pythonpath=DUMPPRE)
    problems = rank_file_differences(ours, tmp_path / "vllm-state", TP)
    assert not problems, "\n".join(problems)
    loaded = vllm("generate", str(ours), "--tp", str(TP), "--dtype", "bfloat16", "--load-format", "sharded_state",
                  *prompt_args())
    assert loaded["outputs"] == default["outputs"]
    assert len({t for seq in loaded["outputs"] for t in seq}) > 3  # tokens vary: comparing them means something

    weight_only = shardstate_tokens(ours)  # shardstate's own run of the same state (bf16, weights dequantized)
    print(f"{case}: vLLM W8A8 tokens equal to shardstate's weight-only run: "
          f"{agreement(loaded['outputs'], weight_only)}")
