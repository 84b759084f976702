"""Reshard on load across (pp, tp) layouts: bytes each rank reads over its own share (the size of its files
in a direct `convert` at the running layout). `.venv/bin/python bench/pp_reshard.py [--moe]`.

A random checkpoint (Llama with tied embeddings, or Qwen3-MoE; hidden 256, 6 layers, vocab 4096) is
converted at every layout below; each running rank's stage model is built, materialised and loaded with the
sharded loader from a state saved at another layout, one rank after the other in this process (the loader
needs no process group). Prints a markdown table."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from shardstate.convert import convert
from shardstate.loaders import IOOptions, load_weights
from shardstate.models import open_model
from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.layers import materialize
from shardstate.synthetic import make_checkpoint

PAIRS = [((1, 4), (1, 2)), ((2, 1), (1, 2)), ((1, 2), (2, 2)), ((2, 2), (1, 4)), ((4, 1), (2, 2)),
         ((1, 4), (2, 1)), ((3, 2), (2, 2)), ((2, 2), (1, 1))]  # (saved (pp, tp), running (pp, tp))
SIZES = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6, "vocab_size": 4096,
         "num_attention_heads": 8, "num_key_value_heads": 4}


def own_share(direct: Path, rank: int, tp: int, pp: int) -> int:
    pattern = f"model-pp-{rank // tp}-tp-{rank % tp}-part-*" if pp > 1 else f"model-rank-{rank}-part-*"
    return sum(p.stat().st_size for p in direct.glob(pattern))


def ratios(root: Path, saved: tuple[int, int], running: tuple[int, int]) -> list[float]:
    model = open_model(root / f"pp{saved[0]}-tp{saved[1]}")
    pp, tp = running
    partition = model.stages(tp, pp)[0].partition
    found = []
    for rank in range(pp * tp):
        stage = model.build_on_meta(TPGroup(rank % tp, tp, pp_rank=rank // tp, pp_size=pp, partition=partition))
        materialize(stage, torch.device("cpu"))
        report = load_weights("sharded", stage, model.directory, rank % tp, IOOptions(), model.saved_layout(tp, pp))
        found.append(report.bytes_read / own_share(root / f"pp{pp}-tp{tp}", rank, tp, pp))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe", action="store_true", help="Qwen3-MoE (embedding, norm, head on every stage)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.moe:
            name, hf = "Qwen3-MoE", make_checkpoint(root / "hf", "Qwen3MoeForCausalLM", seed=0, num_experts=4,
                                                    num_experts_per_tok=2, moe_intermediate_size=256, **SIZES)
        else:
            name, hf = "Llama (tied)", make_checkpoint(root / "hf", "LlamaForCausalLM", seed=0,
                                                       tie_word_embeddings=True, **SIZES)
        for pp, tp in sorted({layout for pair in PAIRS for layout in pair}):
            convert(hf, root / f"pp{pp}-tp{tp}", tp, pp_size=pp, show_progress=False)
        print(f"| {name}: saved (pp, tp) | running (pp, tp) | bytes read / own share, per rank |")
        print("|---|---|---|")
        for saved, running in PAIRS:
            print(f"| {saved} | {running} | {', '.join(f'{r:.3f}' for r in ratios(root, saved, running))} |")


if __name__ == "__main__":
    main()
