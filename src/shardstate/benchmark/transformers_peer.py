"""Drive transformers' tensor-parallel loading as a peer: run under torchrun, one process per rank, each
timing `AutoModelForCausalLM.from_pretrained(DIR, tp_plan="auto")` (gloo on CPU; needs accelerate)
from a common barrier, then greedily generating a few tokens from the loaded model as a check that
it is whole. Each rank writes OUT/rank-N.json (ranks share one stdout, where lines can interleave).

    python -m torch.distributed.run --nproc-per-node 2 transformers_peer.py DIR OUT --prompt-ids 1,2,3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shardstate.memory import peak_rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-ids", default="1,2,3,4")
    parser.add_argument("--new-tokens", type=int, default=2)
    args = parser.parse_args()
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    dist.barrier()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, tp_plan="auto", dtype=getattr(torch, args.dtype))
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                             min_new_tokens=args.new_tokens)
    rank = dist.get_rank()
    (args.out / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "seconds": seconds, "peak_rss": peak, "tokens": out[0, len(prompt):].tolist()}
    ))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
