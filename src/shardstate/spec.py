"""ShardSpec: how one rank-local parameter is made from checkpoint tensors.

A parameter is the concatenation along dim 0 of one or more *parts*. Each part is a checkpoint tensor,
optionally padded along a dim (vLLM pads the vocabulary), cut into `chunks` equal chunks along that dim;
rank r of a TP group of size tp takes chunk `r * chunks // tp`. That one rule covers:

- replicated (norms):                        chunks = 1
- split on dim 0 or 1 (column / row linear): chunks = tp
- fused [q|k|v] or [gate|up]:                several parts, each split on dim 0; k and v take
                                              chunks = num_kv_heads < tp when kv heads are replicated
- vocab split with padding:                  padded = vocab rounded up, chunks = tp; rows past the
                                              real vocabulary are zeros

Every loader and converter asks the spec the same question: `copies(rank)`, the source regions that fill
the rank's tensor, and `byte_runs` turns a region into file byte ranges for partial reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shardstate.errors import brief


@dataclass(frozen=True)
class Part:
    source: str  # checkpoint tensor name
    shape: tuple[int, ...]  # its full (checkpoint) shape
    dim: int = 0
    chunks: int = 1
    padded: int | None = None  # size along `dim` after zero padding; None: shape[dim]

    @property
    def padded_size(self) -> int:
        return self.shape[self.dim] if self.padded is None else self.padded

    @property
    def chunk_size(self) -> int:
        return self.padded_size // self.chunks

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.dim] = self.chunk_size
        return tuple(shape)

    def source_range(self, rank: int, tp_size: int) -> tuple[int, int]:
        """[start, stop) along `dim` of the source tensor that `rank` holds (may be short or empty)."""
        chunk = rank * self.chunks // tp_size
        start = min(chunk * self.chunk_size, self.shape[self.dim])
        stop = min(start + self.chunk_size, self.shape[self.dim])
        return start, stop


@dataclass(frozen=True)
class Copy:
    """Source region `source[dim][start:stop]` goes to rows [dst_row, dst_row + rows) of the local tensor."""

    source: str
    dim: int
    start: int
    stop: int
    dst_row: int
    rows: int


@dataclass(frozen=True)
class ShardSpec:
    kind: str  # replicated | split | fused | vocab: for people and the manifest
    parts: tuple[Part, ...]
    tp_size: int

    def __post_init__(self) -> None:
        for part in self.parts:
            if part.padded_size % part.chunks or part.padded_size < part.shape[part.dim]:
                raise ValueError(f"{part.source}: {part.padded_size} not divisible into {part.chunks} chunks")
            if self.tp_size % part.chunks:
                raise ValueError(f"{part.source}: {part.chunks} chunks do not divide TP size {self.tp_size}")
        if len(self.parts) > 1 and len({p.local_shape()[1:] for p in self.parts}) != 1:
            raise ValueError("fused parts must agree on every dim but 0")

    def local_shape(self) -> tuple[int, ...]:
        shapes = [p.local_shape() for p in self.parts]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def copies(self, rank: int) -> list[Copy]:
        result = []
        row = 0
        for part in self.parts:
            start, stop = part.source_range(rank, self.tp_size)
            rows = stop - start if part.dim == 0 else part.shape[0]
            if stop > start:
                result.append(Copy(part.source, part.dim, start, stop, row, rows))
            row += part.local_shape()[0]
        return result

    def take(self, rank: int, sources: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The rank's tensor, cut from whole source tensors (cast to `dtype`, padding rows zero)."""
        make = torch.empty if self.covers_all_rows(rank) else torch.zeros
        out = make(self.local_shape(), dtype=dtype)
        for c in self.copies(rank):
            out.narrow(0, c.dst_row, c.rows).copy_(sources[c.source].narrow(c.dim, c.start, c.stop - c.start))
        return out

    def put(self, rank: int, local: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
        """The inverse of `take`: write the rank's tensor back into the whole source tensors (resharding:
        after every rank's `put`, every source element is filled)."""
        for c in self.copies(rank):
            into[c.source].narrow(c.dim, c.start, c.stop - c.start).copy_(local.narrow(0, c.dst_row, c.rows))

    def covers_all_rows(self, rank: int) -> bool:
        """False when padding leaves rows that must be zero-filled."""
        return sum(c.rows for c in self.copies(rank)) == self.local_shape()[0]


def replicated(source: str, shape: tuple[int, ...], tp_size: int) -> ShardSpec:
    return ShardSpec("replicated", (Part(source, shape),), tp_size)


def split(source: str, shape: tuple[int, ...], dim: int, tp_size: int) -> ShardSpec:
    return ShardSpec("split", (Part(source, shape, dim, tp_size),), tp_size)


def fused(parts: list[tuple[str, tuple[int, ...], int]], tp_size: int) -> ShardSpec:
    """Parts given as (source, shape, chunks), each split on dim 0, concatenated in order."""
    return ShardSpec("fused", tuple(Part(s, shape, 0, chunks) for s, shape, chunks in parts), tp_size)


def vocab(source: str, shape: tuple[int, ...], padded_rows: int, tp_size: int) -> ShardSpec:
    return ShardSpec("vocab", (Part(source, shape, 0, tp_size, padded_rows),), tp_size)


def byte_runs(shape: tuple[int, ...], itemsize: int, dim: int, start: int, stop: int) -> list[tuple[int, int]]:
    """(offset, length) byte runs, relative to the tensor's first byte, of `tensor[dim][start:stop]` in
    row-major order; adjacent runs are merged, so a dim-0 slice is a single run."""
    inner = math.prod(shape[dim + 1 :]) * itemsize
    outer = math.prod(shape[:dim])
    stride = shape[dim] * inner
    length = (stop - start) * inner
    if length == 0:
        return []
    if length == stride:  # the whole tensor
        return [(0, stride * outer)]
    return [(i * stride + start * inner, length) for i in range(outer)]


SPEC_KINDS = ("replicated", "split", "fused", "vocab")
MAX_PARTS = 64  # a fused parameter joins a handful of tensors (q, k, v; gate, up)
MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 40


def spec_to_json(s: ShardSpec) -> dict:
    """The manifest's form of a spec (explicit, so that renaming a field here cannot silently change it)."""
    return {
        "kind": s.kind,
        "tp_size": s.tp_size,
        "parts": [
            {"source": p.source, "shape": list(p.shape), "dim": p.dim, "chunks": p.chunks, "padded": p.padded}
            for p in s.parts
        ],
    }


def _int(doc: dict, key: str, low: int, high: int, where: str) -> int:
    value = doc.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{where}.{key} is {brief(value)}, not an integer in [{low}, {high}]")
    return value


def spec_from_json(doc: object, where: str = "spec") -> ShardSpec:
    """Parse and check a spec from the manifest; ValueError names the first bad field (`where` prefixes it)."""
    if not isinstance(doc, dict) or set(doc) != {"kind", "tp_size", "parts"}:
        raise ValueError(f"{where} is not an object with exactly kind, tp_size and parts")
    if doc["kind"] not in SPEC_KINDS:
        raise ValueError(f"{where}.kind is {brief(doc['kind'])}, not one of {', '.join(SPEC_KINDS)}")
    tp_size = _int(doc, "tp_size", 1, 1 << 16, where)
    raw_parts = doc["parts"]
    if not isinstance(raw_parts, list) or not 1 <= len(raw_parts) <= MAX_PARTS:
        raise ValueError(f"{where}.parts is not a list of 1 to {MAX_PARTS} parts")
    parts = []
    for n, raw in enumerate(raw_parts):
        at = f"{where}.parts[{n}]"
        if not isinstance(raw, dict) or set(raw) != {"source", "shape", "dim", "chunks", "padded"}:
            raise ValueError(f"{at} is not an object with exactly source, shape, dim, chunks and padded")
        shape = raw["shape"]
        if not isinstance(raw["source"], str) or not raw["source"]:
            raise ValueError(f"{at}.source is not a tensor name")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS
                or not all(type(d) is int and 0 < d <= MAX_DIM_SIZE for d in shape)):
            raise ValueError(f"{at}.shape is {brief(shape)}, not 1 to {MAX_DIMS} positive sizes")
        dim = _int(raw, "dim", 0, len(shape) - 1, at)
        chunks = _int(raw, "chunks", 1, tp_size, at)
        padded = None if raw["padded"] is None else _int(raw, "padded", shape[dim], MAX_DIM_SIZE, at)
        parts.append(Part(raw["source"], tuple(shape), dim, chunks, padded))
    try:
        return ShardSpec(doc["kind"], tuple(parts), tp_size)
    except ValueError as exc:  # __post_init__: parts that do not divide or do not fit together
        raise ValueError(f"{where} {exc}") from None
