"""ShardSpec: where every element of one rank-local parameter comes from (v2: n-d regions).

A rank-local tensor is made of *parts*. A part takes a region (`box`) of one checkpoint tensor (the whole
tensor, or one slice of a fused source such as Phi-3's `qkv_proj`), optionally zero-padded along `dim`
(vLLM pads the vocabulary), and cuts it into `chunks` equal chunks along `dim`; rank r of TP size tp takes
chunk `r * chunks // tp`. The parts' chunks are joined along `join_dim` of the local tensor. With
`experts` = E > 0, the joined tensor is repeated along a new leading dim for e = 0..E-1, each time with
"{e}" in the parts' source names replaced by e (vLLM's fused MoE weights, `w13_weight [E, 2I/tp, H]`).

That covers replicated norms (chunks 1), column and row splits (chunks = tp on dim 0 or 1), fused
[q|k|v] and [gate|up] (kv heads replicated when tp > kv heads: chunks = kv heads), the padded vocabulary,
stacked experts and fused sources. A spec that would overlap or misplace elements is refused when made.

Every consumer asks the same question, `copies(rank)`: pairs of n-d boxes (source region -> local region).
`take` cuts a rank's tensor from whole sources, `put` is its inverse (resharding), and `byte_runs` turns a
source region into file byte ranges (partial and remote reads).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shardstate.errors import brief

Box = tuple[tuple[int, int], ...]  # (start, length) per dim
EXPERT = "{e}"  # in a stacked part's source name: the expert index


def cut(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """The view of `tensor` inside `box`."""
    for dim, (start, length) in enumerate(box):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def whole(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


@dataclass(frozen=True)
class Part:
    source: str  # checkpoint tensor name ("{e}" standing for the expert index when the spec is stacked)
    shape: tuple[int, ...]  # the whole checkpoint tensor's shape
    dim: int = 0  # the dim cut into chunks
    chunks: int = 1
    padded: int | None = None  # the region's size along `dim` after zero padding; None: unpadded
    box: Box | None = None  # the region of the source this part uses; None: all of it

    @property
    def region(self) -> Box:
        return whole(self.shape) if self.box is None else self.box

    @property
    def region_shape(self) -> tuple[int, ...]:
        return tuple(length for _, length in self.region)

    @property
    def chunk_size(self) -> int:
        padded = self.region_shape[self.dim] if self.padded is None else self.padded
        return padded // self.chunks

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.region_shape)
        shape[self.dim] = self.chunk_size
        return tuple(shape)

    def source_box(self, rank: int, tp_size: int) -> Box | None:
        """The region of the source that `rank`'s chunk holds (short at padding), or None when all padding."""
        size = self.region_shape[self.dim]
        first = min(rank * self.chunks // tp_size * self.chunk_size, size)
        length = min(self.chunk_size, size - first)
        if length <= 0:
            return None
        box = list(self.region)
        box[self.dim] = (box[self.dim][0] + first, length)
        return tuple(box)

    def check(self, tp_size: int) -> None:
        n = len(self.shape)
        if not 1 <= n <= MAX_DIMS or not all(0 < d < MAX_DIM_SIZE for d in self.shape):
            raise ValueError(f"{self.source}: shape {list(self.shape)} is not 1 to {MAX_DIMS} positive sizes")
        if self.box is not None and (len(self.box) != n or not all(
                start >= 0 and length > 0 and start + length <= size
                for (start, length), size in zip(self.box, self.shape, strict=True))):
            raise ValueError(f"{self.source}: box {[list(b) for b in self.box]} is not inside shape {list(self.shape)}")
        if not 0 <= self.dim < n:
            raise ValueError(f"{self.source}: dim {self.dim} is not a dim of shape {list(self.shape)}")
        size = self.region_shape[self.dim]
        padded = size if self.padded is None else self.padded
        if self.chunks < 1 or tp_size % self.chunks or padded < size or padded % self.chunks:
            raise ValueError(f"{self.source}: {padded} (padded from {size}) does not cut into {self.chunks} chunks "
                             f"for TP size {tp_size}")


@dataclass(frozen=True)
class Copy:
    """Region `src` of checkpoint tensor `source` fills region `dst` of the local tensor (`dst` has one more
    dim, of length 1, when the spec is stacked)."""

    source: str
    src: Box
    dst: Box

    def dest(self, local: torch.Tensor) -> torch.Tensor:
        """The local tensor's view that this copy fills, shaped like the source region."""
        view = cut(local, self.dst)
        return view.squeeze(0) if view.dim() > len(self.src) else view

    def numel(self) -> int:
        return math.prod(length for _, length in self.src)


@dataclass(frozen=True)
class ShardSpec:
    parts: tuple[Part, ...]
    tp_size: int
    join_dim: int = 0
    experts: int = 0  # > 0: stacked along a new leading dim, once per expert

    def __post_init__(self) -> None:
        if not 1 <= len(self.parts) <= MAX_PARTS or not 1 <= self.tp_size <= MAX_TP:
            raise ValueError(f"{len(self.parts)} parts at TP size {self.tp_size}")
        for part in self.parts:
            part.check(self.tp_size)
            if part.source.count(EXPERT) != (1 if self.experts else 0):
                raise ValueError(f"{part.source}: a stacked spec's sources name {EXPERT} once, others never")
        shapes = [p.local_shape() for p in self.parts]
        if len({len(s) for s in shapes}) != 1 or not 0 <= self.join_dim < len(shapes[0]):
            raise ValueError(f"parts of {len(shapes[0])} dims cannot be joined along dim {self.join_dim}")
        if len({s[: self.join_dim] + s[self.join_dim + 1 :] for s in shapes}) != 1:
            raise ValueError(f"parts {[list(s) for s in shapes]} differ on a dim other than {self.join_dim}")
        if not 0 <= self.experts <= MAX_EXPERTS:
            raise ValueError(f"{self.experts} experts")
        self._check_disjoint_sources()

    def _check_disjoint_sources(self) -> None:
        """Refuse two parts naming one source (after "{e}" is expanded) with different whole shapes or
        overlapping regions: an element would be taken twice, and `put` could not tell which copy is right."""
        by_source: dict[str, list[Part]] = {}
        for part in self.parts:
            for name in self.expert_sources(part.source):
                by_source.setdefault(name, []).append(part)
        for name, parts in by_source.items():
            for a, b in itertools.combinations(parts, 2):
                if a.shape != b.shape:
                    raise ValueError(f"{name}: parts give it shapes {list(a.shape)} and {list(b.shape)}")
                if all(sa < sb + lb and sb < sa + la for (sa, la), (sb, lb) in zip(a.region, b.region, strict=True)):
                    raise ValueError(f"{name}: two parts use overlapping regions")

    @property
    def kind(self) -> str:
        """For people (inspect): what sort of layout this is."""
        if self.experts:
            return "experts"
        if len(self.parts) > 1:
            return "fused"
        part = self.parts[0]
        return "vocab" if part.padded is not None else "replicated" if part.chunks == 1 else "split"

    def _joined(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        joined = list(shapes[0])
        joined[self.join_dim] = sum(s[self.join_dim] for s in shapes)
        return ((self.experts,) if self.experts else ()) + tuple(joined)

    def local_shape(self) -> tuple[int, ...]:
        return self._joined([p.local_shape() for p in self.parts])

    def global_shape(self) -> tuple[int, ...]:
        """The shape the parameter has at TP=1 without padding (recorded for people and tools)."""
        return self._joined([p.region_shape for p in self.parts])

    def expert_sources(self, source: str) -> list[str]:
        return [source.replace(EXPERT, str(e)) for e in range(self.experts)] if self.experts else [source]

    def sources(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor this parameter is cut from, with its whole shape."""
        return {name: p.shape for p in self.parts for name in self.expert_sources(p.source)}

    def copies(self, rank: int) -> list[Copy]:
        result = []
        for e in range(self.experts) if self.experts else (None,):
            stack = () if e is None else ((e, 1),)
            offset = 0
            for part in self.parts:
                box = part.source_box(rank, self.tp_size)
                if box is not None:
                    dst = [(0, length) for _, length in box]
                    dst[self.join_dim] = (offset, dst[self.join_dim][1])
                    source = part.source if e is None else part.source.replace(EXPERT, str(e))
                    result.append(Copy(source, box, stack + tuple(dst)))
                offset += part.local_shape()[self.join_dim]
        return result

    def covers_all(self, rank: int) -> bool:
        """False when padding leaves elements that must be zero-filled."""
        return sum(c.numel() for c in self.copies(rank)) == math.prod(self.local_shape())

    def take(self, rank: int, sources: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The rank's tensor, cut from whole source tensors (cast to `dtype`, padding zero)."""
        make = torch.empty if self.covers_all(rank) else torch.zeros
        out = make(self.local_shape(), dtype=dtype)
        for c in self.copies(rank):
            c.dest(out).copy_(cut(sources[c.source], c.src))
        return out

    def put(self, rank: int, local: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
        """The inverse of `take`: write the rank's tensor back into the whole source tensors (resharding:
        after every rank's `put`, every source element a part uses is filled)."""
        for c in self.copies(rank):
            cut(into[c.source], c.src).copy_(c.dest(local))


@dataclass(frozen=True)
class Transfer:
    """Region `saved` of saved rank `saved_rank`'s tensor fills region `local` of this rank's (same
    lengths; each has the stacked dim where its spec is stacked)."""

    saved_rank: int
    saved: Box
    local: Box


def _overlap(a: Box, b: Box) -> Box | None:
    box = []
    for (sa, la), (sb, lb) in zip(a, b, strict=True):
        start, end = max(sa, sb), min(sa + la, sb + lb)
        if end <= start:
            return None
        box.append((start, end - start))
    return tuple(box)


def _moved(dst: Box, src: Box, region: Box) -> Box:
    """Where `region` (inside source box `src`) lands, given that `src` lands at `dst` (a stacked `dst`
    keeps its leading expert dim)."""
    stack = len(dst) - len(src)
    return dst[:stack] + tuple((d + r - s, length) for (d, _), (s, _), (r, length) in zip(dst[stack:], src, region,
                                                                                          strict=True))


def reshard_copies(spec: ShardSpec, rank: int, saved: ShardSpec) -> list[Transfer]:
    """How `rank`'s tensor (cut by `spec`) is filled from the tensors of a state saved with `saved` (the same
    parameter at another TP size): each of the rank's source boxes intersected with each saved rank's. A
    source element several saved ranks hold (replicated) is read once, from the saved rank nearest this
    one's position. ValueError when the saved ranks do not cover what the rank needs."""
    if spec.experts != saved.experts or spec.sources() != saved.sources():
        raise ValueError("saved from other source tensors")
    wanted: dict[str, list[Copy]] = {}
    for c in spec.copies(rank):
        wanted.setdefault(c.source, []).append(c)
    nearest = sorted(range(saved.tp_size), key=lambda r: (abs(r * spec.tp_size - rank * saved.tp_size), r))
    taken: set[tuple[str, Box]] = set()
    transfers = []
    for saved_rank in nearest:
        for theirs in saved.copies(saved_rank):
            for mine in wanted.get(theirs.source, ()):
                region = _overlap(mine.src, theirs.src)
                if region is None or (theirs.source, region) in taken:
                    continue
                taken.add((theirs.source, region))
                transfers.append(Transfer(saved_rank, _moved(theirs.dst, theirs.src, region),
                                          _moved(mine.dst, mine.src, region)))
    needed = sum(c.numel() for c in spec.copies(rank))
    if sum(math.prod(length for _, length in t.local) for t in transfers) != needed:
        raise ValueError("the saved ranks do not hold every element exactly once")
    return transfers


def replicated(source: str, shape: tuple[int, ...], tp_size: int) -> ShardSpec:
    return ShardSpec((Part(source, shape),), tp_size)


def split(source: str, shape: tuple[int, ...], dim: int, tp_size: int) -> ShardSpec:
    return ShardSpec((Part(source, shape, dim, tp_size),), tp_size)


def fused(parts: list[tuple[str, tuple[int, ...], int]], tp_size: int) -> ShardSpec:
    """Parts given as (source, shape, chunks), each split on dim 0, joined in order."""
    return ShardSpec(tuple(Part(s, shape, 0, chunks) for s, shape, chunks in parts), tp_size)


def vocab(source: str, shape: tuple[int, ...], padded_rows: int, tp_size: int) -> ShardSpec:
    return ShardSpec((Part(source, shape, 0, tp_size, padded_rows),), tp_size)


def byte_runs(shape: tuple[int, ...], itemsize: int, box: Box) -> list[tuple[int, int]]:
    """(offset, length) byte runs, relative to the tensor's first byte, of the region `box` of a row-major
    tensor, in order; adjacent runs are merged (a dim-0 slice is a single run)."""
    if any(length == 0 for _, length in box):
        return []
    strides = [math.prod(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    inner = len(shape) - 1  # the innermost dim not covered whole: runs are contiguous below it
    while inner > 0 and box[inner] == (0, shape[inner]):
        inner -= 1
    run = box[inner][1] * strides[inner]
    runs: list[tuple[int, int]] = []
    for index in itertools.product(*(range(start, start + length) for start, length in box[:inner])):
        offset = sum(i * s for i, s in zip(index, strides, strict=False)) + box[inner][0] * strides[inner]
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + run)
        else:
            runs.append((offset, run))
    return runs


MAX_PARTS = 64  # a fused parameter joins a handful of tensors (q, k, v; gate, up); experts are stacked
MAX_EXPERTS = 1 << 12
MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 40
MAX_TP = 1024  # the one bound on a TP size (CLI, manifest, spec): far above any real TP group
SPEC_VERSION = 2  # the manifest's form of a spec; version 1 manifests hold the kind-tagged form (spec_from_json)


def spec_to_json(s: ShardSpec) -> dict:
    """The manifest's form of a spec (explicit, so that renaming a field here cannot silently change it)."""
    return {
        "tp_size": s.tp_size, "join_dim": s.join_dim, "experts": s.experts,
        "parts": [
            {"source": p.source, "shape": list(p.shape), "dim": p.dim, "chunks": p.chunks, "padded": p.padded,
             "box": None if p.box is None else [list(b) for b in p.box]}
            for p in s.parts
        ],
    }


def _int(doc: dict, key: str, low: int, high: int, where: str) -> int:
    value = doc.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{where}.{key} is {brief(value)}, not an integer in [{low}, {high}]")
    return value


def _keys(doc: object, keys: set[str], where: str) -> dict:
    if not isinstance(doc, dict) or set(doc) != keys:
        raise ValueError(f"{where} is not an object with exactly {', '.join(sorted(keys))}")
    return doc


def _box(value: object, rank: int, where: str) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != rank or not all(
            isinstance(b, list) and len(b) == 2 and all(type(n) is int and 0 <= n <= MAX_DIM_SIZE for n in b)
            for b in value):
        raise ValueError(f"{where}.box is {brief(value)}, not null or {rank} [start, length] pairs")
    return tuple((start, length) for start, length in value)


def _part(raw: object, tp_size: int, where: str, version: int) -> Part:
    keys = {"source", "shape", "dim", "chunks", "padded"} | ({"box"} if version >= 2 else set())
    raw = _keys(raw, keys, where)
    shape = raw["shape"]
    if not isinstance(raw["source"], str) or not raw["source"]:
        raise ValueError(f"{where}.source is not a tensor name")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS
            or not all(type(d) is int and 0 < d < MAX_DIM_SIZE for d in shape)):
        raise ValueError(f"{where}.shape is {brief(shape)}, not 1 to {MAX_DIMS} positive sizes")
    dim = _int(raw, "dim", 0, len(shape) - 1, where)
    chunks = _int(raw, "chunks", 1, tp_size, where)
    padded = None if raw["padded"] is None else _int(raw, "padded", 1, MAX_DIM_SIZE, where)
    return Part(raw["source"], tuple(shape), dim, chunks, padded, _box(raw.get("box"), len(shape), where))


def spec_from_json(doc: object, where: str = "spec", version: int = SPEC_VERSION) -> ShardSpec:
    """Parse and check a spec from a manifest of format `version` (1 or 2); ValueError names the first bad
    field (`where` prefixes it). Version 1 specs are joined on dim 0 and never stacked."""
    if version == 1:
        doc = _keys(doc, {"kind", "tp_size", "parts"}, where)
        if doc["kind"] not in ("replicated", "split", "fused", "vocab"):
            raise ValueError(f"{where}.kind is {brief(doc['kind'])}, not one of replicated, split, fused, vocab")
        join_dim = experts = 0
    else:
        doc = _keys(doc, {"tp_size", "join_dim", "experts", "parts"}, where)
        join_dim = _int(doc, "join_dim", 0, MAX_DIMS - 1, where)
        experts = _int(doc, "experts", 0, MAX_EXPERTS, where)
    tp_size = _int(doc, "tp_size", 1, MAX_TP, where)
    raw_parts = doc["parts"]
    if not isinstance(raw_parts, list) or not 1 <= len(raw_parts) <= MAX_PARTS:
        raise ValueError(f"{where}.parts is not a list of 1 to {MAX_PARTS} parts")
    parts = tuple(_part(raw, tp_size, f"{where}.parts[{n}]", version) for n, raw in enumerate(raw_parts))
    try:
        return ShardSpec(parts, tp_size, join_dim, experts)
    except ValueError as exc:  # __post_init__: parts that do not cut or do not fit together
        raise ValueError(f"{where} {exc}") from None
