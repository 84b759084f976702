"""`shardstate bench --families`: per model family, the bytes each rank reads and its load time with the
default, sliced and sharded loaders at one TP size (warm page cache), on random checkpoints of a few
hundred MB made with transformers (`--smoke`: tiny ones). Writes families.json and families.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from shardstate.benchmark import say, shardstate_run, write_rows
from shardstate.convert import convert
from shardstate.synthetic import make_checkpoint

SIZES = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
         "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 1024}
SMOKE_SIZES = {**SIZES, "vocab_size": 203, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 704}
FAMILIES = {  # architecture: config overrides (8 experts for the MoE families)
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {"sliding_window": 512},
    "Qwen2ForCausalLM": {"tie_word_embeddings": True},
    "Qwen3ForCausalLM": {"head_dim": 64},
    "Phi3ForCausalLM": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "MixtralForCausalLM": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 704},
    "Qwen2MoeForCausalLM": {**MOE, "num_experts": 8, "shared_expert_intermediate_size": 1408},
    "Qwen3MoeForCausalLM": {**MOE, "num_experts": 8, "head_dim": 64},
}
LOADS = (("default", "default", False), ("sliced", "sliced", False), ("sharded", "sharded", True))


def ensure_family(root: Path, architecture: str, smoke: bool) -> Path:
    target = root / f"{'smoke-' if smoke else ''}family-{architecture}"
    if not (target / "config.json").is_file():
        partial = target.with_name(target.name + ".partial")
        sizes = {**SIZES, **FAMILIES[architecture]}
        if smoke:  # every size of the family's shape, made small (experts' sizes included)
            experts = {k: 32 for k in sizes if k.endswith("intermediate_size") and k != "intermediate_size"}
            sizes = {**sizes, **SMOKE_SIZES, **experts}
        try:
            make_checkpoint(partial, architecture, seed=0, dtype=torch.bfloat16, initializer_range=0.02, **sizes)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(target)
    return target


def run_families(out_dir: Path, cache_root: Path, tp: int = 2, smoke: bool = False,
                 architectures: tuple[str, ...] = tuple(FAMILIES)) -> list[dict]:
    rows = []
    for architecture in architectures:
        source = ensure_family(cache_root, architecture, smoke)
        sharded = cache_root / f"{source.name}-tp{tp}"
        convert(source, sharded, tp, force=True, show_progress=False)
        checkpoint_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        tokens = None
        for name, load_format, on_sharded in LOADS:
            result = shardstate_run(sharded if on_sharded else source, tp, load_format, "read", None)
            tokens = tokens or result["tokens"]
            row = {"architecture": architecture, "tp": tp, "load": name, "checkpoint_bytes": checkpoint_bytes,
                   "seconds": result["seconds"], "bytes_per_rank": [r["bytes_read"] for r in result["per_rank"]],
                   "same_tokens": result["tokens"] == tokens}
            rows.append(row)
            say(f"{architecture} TP={tp} {name}: {row['seconds']:.3f}s, "
                f"{max(row['bytes_per_rank']) / 1e6:.1f} MB per rank of {checkpoint_bytes / 1e6:.1f} MB")
    return write_rows(out_dir, "families", rows, families_table(rows))


def families_table(rows: list[dict]) -> str:
    tp = rows[0]["tp"]
    lines = [f"Warm page cache, TP={tp}; cell: slowest rank's load seconds / MB read by the busiest rank.", "",
             "| family | checkpoint MB | default | sliced | sharded | same tokens |", "|---|---|---|---|---|---|"]
    for architecture in dict.fromkeys(r["architecture"] for r in rows):
        mine = {r["load"]: r for r in rows if r["architecture"] == architecture}
        cells = [f"{mine[n]['seconds']:.3f}s / {max(mine[n]['bytes_per_rank']) / 1e6:.0f} MB" for n, _, _ in LOADS]
        same = "yes" if all(r["same_tokens"] for r in mine.values()) else "NO"
        lines.append(f"| {architecture} | {mine['default']['checkpoint_bytes'] / 1e6:.0f} | " + " | ".join(cells)
                     + f" | {same} |")
    return "\n".join(lines) + "\n"
