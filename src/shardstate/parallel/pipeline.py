"""Pipeline-parallel stages: which decoder layers each stage holds, split exactly as vLLM 0.32's
`vllm.distributed.utils.get_pp_indices` splits them, so that a stage's files hold the layers vLLM's stage
of the same rank builds (and a vLLM-written PP state holds ours)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from shardstate.errors import ShardstateError, brief

PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"  # vLLM's override: layers per stage, comma-separated
MAX_PP = 256  # the one bound on a PP size (CLI, manifest)


def layer_partition(num_layers: int, pp_size: int, override: str | None = None) -> list[int]:
    """Layers per stage. Evenly split; the remainder goes one layer each to the stages before the last,
    nearest the last first (vLLM: the last stage holds the norm and the LM head). `override` (by default
    $VLLM_PP_LAYER_PARTITION) gives the layers per stage instead. A stage without layers is refused:
    vLLM would build it, but it could only pass its input on."""
    if override is None:
        override = os.environ.get(PARTITION_ENV)
    if override is not None:
        try:
            partition = [int(layers) for layers in override.split(",")]  # int() as vLLM parses them
        except ValueError:
            raise ShardstateError(f"{PARTITION_ENV}={brief(override)} is not comma-separated layer counts", None,
                                  f"set it to {pp_size} counts adding up to {num_layers}, or unset it") from None
        if len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
            raise ShardstateError(
                f"{PARTITION_ENV}={brief(override)} does not give {pp_size} stages of at least one layer adding up "
                f"to num_hidden_layers={num_layers}", None,
                f"set it to {pp_size} positive counts adding up to {num_layers}, or unset it")
        return partition
    if num_layers < pp_size:
        raise ShardstateError(f"PP size {pp_size} is more than the model's {num_layers} layers", None,
                              f"use --pp {num_layers} or less")
    partition = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        partition[-i] += 1
    return partition


def layout_name(tp_size: int, pp_size: int = 1, options: bool = False) -> str:
    """"TP=2", "TP=2 PP=2", or as options "--tp 2 --pp 2" (PP named only where it is not 1)."""
    tp, pp = ("--tp {}", " --pp {}") if options else ("TP={}", " PP={}")
    return tp.format(tp_size) + (pp.format(pp_size) if pp_size > 1 else "")


def stage_layers(num_layers: int, pp_rank: int, pp_size: int, partition: Sequence[int] | None = None) -> range:
    """The global indices of the layers stage `pp_rank` holds (vLLM's `get_pp_indices` as a range; with
    `partition`, that split instead: a state's own). At PP=1 every layer, whatever $VLLM_PP_LAYER_PARTITION
    says (it is for PP runs)."""
    if pp_size == 1:
        return range(num_layers)
    partition = partition or layer_partition(num_layers, pp_size)
    start = sum(partition[:pp_rank])
    return range(start, start + partition[pp_rank])
