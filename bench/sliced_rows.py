"""The sliced loader's dim-1 slices (`o_proj`, `down_proj`, each expert's `w2`): one pread per row (A, the
rows window at 0) against whole rows read into scratch (B, loaders/boxes.py's WINDOW), warm page cache.
`.venv/bin/python bench/sliced_rows.py [ARCHITECTURE ...] [--tp 2]`.

The random bf16 checkpoints of `bench --families` (hidden 1024, 4 layers; MoE: 8 experts) are made under
--cache-dir once; each rank's model is built, materialised and filled with `read_boxes`, one rank after the
other in this process (no process group; one torch thread, as a worker at TP=2 on a 2-core machine). A and B
alternate; the preads are counted and every round's parameters are checked equal to the first round's.
Prints one line per architecture: preads per load (all ranks), the median seconds of all ranks' fills."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from shardstate.benchmark.families import ensure_family
from shardstate.io import storage
from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget, open_checked
from shardstate.loaders.boxes import WINDOW, read_boxes
from shardstate.models import open_model
from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.layers import materialize

ROUNDS = 10  # the first (page cache and parameters warming) is not timed


def count_preads() -> list[int]:
    calls = [0]
    read_into = storage.LocalFile.read_into

    def counted(self: storage.LocalFile, offset: int, buffer: memoryview) -> int:
        calls[0] += 1
        return read_into(self, offset, buffer)

    storage.LocalFile.read_into = counted  # type: ignore[method-assign]
    return calls


def fill(models: list, source: Path, window: int) -> float:
    seconds = 0.0
    for rank, model in enumerate(models):
        target = LoadTarget.of(model, rank)
        with ReadAccount() as account:
            checkpoint = open_checked(target.specs, source, account)
            plan = [(checkpoint.tensors[c.source], dest, c) for dest, c in target.zero_padding_and_plan()]
            start = time.perf_counter()
            read_boxes(plan, account, window=window)
            seconds += time.perf_counter() - start
    return seconds


def compare(architecture: str, tp: int, cache_dir: Path, calls: list[int]) -> str:
    source = ensure_family(cache_dir, architecture, smoke=False)
    opened = open_model(source)
    models = [opened.build_on_meta(TPGroup(rank, tp)) for rank in range(tp)]
    for model in models:
        materialize(model, torch.device("cpu"))
    times: dict[str, list[float]] = {"A": [], "B": []}
    preads: dict[str, int] = {}
    first = None
    for round_ in range(ROUNDS):
        order = (("A", 0), ("B", WINDOW)) if round_ % 2 == 0 else (("B", WINDOW), ("A", 0))
        for name, window in order:
            calls[0] = 0
            seconds = fill(models, source, window)
            preads[name] = calls[0]
            if round_ > 0:
                times[name].append(seconds)
            state = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
            first = first or state
            assert all(torch.equal(a[k], b[k]) for a, b in zip(state, first, strict=True) for k in a), name
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    return (f"{architecture} TP={tp}: preads A {preads['A']} B {preads['B']}; seconds A {a:.3f} B {b:.3f} "
            f"(A/B {a / b:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("architectures", nargs="*", default=["Qwen2MoeForCausalLM", "MixtralForCausalLM",
                                                             "LlamaForCausalLM"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/shardstate-bench-families"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls = count_preads()
    for architecture in args.architectures:
        print(compare(architecture, args.tp, args.cache_dir, calls), flush=True)


if __name__ == "__main__":
    main()
