"""Sharded states' rank files read back whole, for comparing two states key by key; whole directories
compared byte by byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def rank_tensors(root: Path, rank: int) -> dict:
    return files_tensors(root, f"model-rank-{rank}-part-*.safetensors", f"rank {rank}")


def stage_tensors(root: Path, pp: int, tp: int) -> dict:
    """The tensors of stage `pp`, TP rank `tp` of a PP state (vLLM's `model-pp-P-tp-T-part-N` files)."""
    return files_tensors(root, f"model-pp-{pp}-tp-{tp}-part-*.safetensors", f"pp {pp} tp {tp}")


def files_tensors(root: Path, pattern: str, who: str) -> dict:
    """Every tensor of the files matching `pattern` (one rank's parts), each once."""
    tensors = {}
    for path in sorted(root.glob(pattern)):
        for key, tensor in load_file(path).items():
            assert key not in tensors, f"{key} twice in {root.name} {who}"
            tensors[key] = tensor
    assert tensors, f"no files of {who} in {root}"
    return tensors


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file in a directory, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def assert_same_directory(a: Path, b: Path) -> None:
    """Byte-identical states: the same names, and every file (rank files, side files, manifest) equal."""
    assert file_digests(a) == file_digests(b), f"{a} and {b} differ"


def rank_file_differences(ours: Path, theirs: Path, tp: int, pp: int = 1) -> list[str]:
    """Every key, shape, dtype or value where shardstate's rank files (`ours`) and vLLM's differ; with pp > 1
    stage by stage (`model-pp-P-tp-T-part-N` files)."""
    problems = []
    for stage, rank in [(s, t) for s in range(pp) for t in range(tp)]:
        if pp == 1:
            who, mine, vllms = f"rank {rank}", rank_tensors(ours, rank), rank_tensors(theirs, rank)
        else:
            who = f"pp {stage} tp {rank}"
            mine, vllms = stage_tensors(ours, stage, rank), stage_tensors(theirs, stage, rank)
        for key in sorted(mine.keys() - vllms.keys()):
            problems.append(f"{who}: only shardstate has {key} {list(mine[key].shape)} {mine[key].dtype}")
        for key in sorted(vllms.keys() - mine.keys()):
            problems.append(f"{who}: only vLLM has {key} {list(vllms[key].shape)} {vllms[key].dtype}")
        for key in sorted(mine.keys() & vllms.keys()):
            a, b = mine[key], vllms[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                problems.append(f"{who}: {key} shardstate {list(a.shape)} {a.dtype}, vLLM {list(b.shape)} {b.dtype}")
            elif not a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)):
                problems.append(f"{who}: {key} {list(a.shape)} values differ")
    return problems
