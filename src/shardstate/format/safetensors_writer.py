"""Lay out safetensors files before writing them: split tensors into parts and build each header, so
every tensor's final file offset is known and data can be written in any order (pwrite)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from shardstate.format.safetensors_header import DTYPE_NAMES

ALIGNMENT = 8  # safetensors pads the header so the data section starts 8-byte aligned


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FileLayout:
    header: bytes  # 8-byte length + JSON, padded
    offsets: dict[str, int]  # tensor name -> absolute offset of its first byte
    size: int


def split_into_parts(tensors: list[OutTensor], max_part_bytes: int) -> list[list[OutTensor]]:
    """Keep order; start a new part when the next tensor would pass the limit. Never an empty part; a
    tensor over the limit gets a part of its own."""
    parts: list[list[OutTensor]] = []
    size = 0
    for tensor in tensors:
        if not parts or (parts[-1] and size + tensor.nbytes > max_part_bytes):
            parts.append([])
            size = 0
        parts[-1].append(tensor)
        size += tensor.nbytes
    return parts


def layout(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> FileLayout:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    cursor = 0
    relative = {}
    for t in tensors:
        offsets = [cursor, cursor + t.nbytes]
        entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": offsets}
        relative[t.name] = cursor
        cursor += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGNMENT)
    header = len(blob).to_bytes(8, "little") + blob
    return FileLayout(header, {n: len(header) + off for n, off in relative.items()}, len(header) + cursor)
