"""Every model family on the CUDA load path: `PYTHONPATH=src python3 bench/gpu_families.py --out DIR`.

Per family, a random fp32 checkpoint (transformers, std 0.1), converted to TP=1; loaded onto cuda:0 by the
default, sliced and sharded loaders: weights bit-identical across loaders, greedy tokens equal to each other
and to transformers' own model run on the same GPU in fp32. Without a GPU it runs on the CPU."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from shardstate.convert import convert
from shardstate.runtime.llm import LLM
from shardstate.synthetic import make_checkpoint

MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 64}
FAMILIES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {"sliding_window": 6},
    "Qwen2ForCausalLM": {"tie_word_embeddings": True},
    "Qwen3ForCausalLM": {"head_dim": 32},
    "Phi3ForCausalLM": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 7},
    "MixtralForCausalLM": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "Qwen2MoeForCausalLM": {**MOE, "num_experts": 8, "shared_expert_intermediate_size": 96},
    "Qwen3MoeForCausalLM": {**MOE, "num_experts": 8, "head_dim": 32, "norm_topk_prob": True},
}
SIZES = {"vocab_size": 1003, "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2}
PROMPTS = [[1, 5, 9, 33, 7, 120, 3, 4, 5, 6, 40, 41], [4, 100, 2, 8], [150, 7]]
STEPS = 8


def transformers_tokens(model_dir: Path, device: torch.device) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    result = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids, out = torch.tensor([prompt], device=device), []
            for _ in range(STEPS):
                out.append(int(model(ids).logits[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[out[-1]]], device=device)], dim=1)
            result.append(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    root = Path(tempfile.mkdtemp(prefix="gpu-families-"))
    rows, bad = [], []
    for architecture, overrides in FAMILIES.items():
        source = make_checkpoint(root / architecture, architecture, seed=5, initializer_range=0.1,
                                 **{**SIZES, **overrides})
        convert(source, root / f"{architecture}-tp1", 1)
        reference = transformers_tokens(source, device)
        states = {}
        for load_format, directory in (("default", source), ("sliced", source),
                                       ("sharded", root / f"{architecture}-tp1")):
            with LLM(directory, load_format=load_format) as llm:
                tokens = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)]
                states[load_format] = llm.rank_state_dicts()[0]
                seconds = llm.load_reports[0].seconds
            identical = all(torch.equal(states[load_format][k], states["default"][k]) for k in states["default"])
            row = {"architecture": architecture, "load": load_format, "device": str(device), "seconds": seconds,
                   "tokens_equal_transformers": tokens == reference, "weights_identical": identical}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not (row["tokens_equal_transformers"] and identical):
                bad.append(f"{architecture}/{load_format}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-families.json").write_text(json.dumps(rows, indent=1))
    print("all families: weights identical across loaders, tokens equal transformers'" if not bad
          else f"error: differences for {bad}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
