"""Read and validate a safetensors header without trusting it.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section. Each JSON
entry gives dtype, shape and [begin, end) byte offsets relative to the data section; `__metadata__`
holds string-to-string metadata.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.format.strict_json import loads_strict
from shardstate.io.storage import FileReader, LocalFile

MAX_HEADER_BYTES = 100 * 1024 * 1024
FIRST_READ = 64 << 10  # one read (one request, for an object) that holds most headers whole

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in its file (offsets absolute, from the start of the file)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # 8 + header length: also what reading the header costs
    tensors: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str]


def _bad(where: str | os.PathLike[str], what: str) -> ShardstateError:
    return ShardstateError(f"invalid safetensors file ({what})", where, "re-create or re-download this file")


def read_header(path: str | os.PathLike[str], reader: FileReader | None = None) -> SafetensorsHeader:
    """Parse and validate the header of `path` (read through `reader`, e.g. an object in S3, when
    given); raise ShardstateError naming the file (or object) on any defect."""
    path = Path(path)
    if reader is not None:
        try:
            return _parse(path, reader, reader.where)
        except OSError as exc:
            raise ShardstateError(f"cannot read ({exc.strerror})", reader.where, "check the file") from None
    try:
        local = LocalFile(path)
    except OSError as exc:
        raise ShardstateError(f"cannot read ({exc.strerror})", path, "check the path and permissions") from None
    try:
        return _parse(path, local, path)
    except OSError as exc:
        raise ShardstateError(f"cannot read ({exc.strerror})", path, "check the path and permissions") from None
    finally:
        local.close()


def _parse(path: Path, reader: FileReader, where: str | os.PathLike[str]) -> SafetensorsHeader:
    file_size = reader.size
    first = bytearray(min(FIRST_READ, file_size))
    got = reader.read_into(0, memoryview(first))
    if got < 8:
        raise _bad(where, "shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", first[:8])
    if length > MAX_HEADER_BYTES:
        raise _bad(where, f"header length {length} over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > file_size:
        raise _bad(where, f"header length {length} runs past the end of the file")
    raw, have = bytearray(length), min(got - 8, length)
    raw[:have] = first[8 : 8 + have]
    if have < length and reader.read_into(8 + have, memoryview(raw)[have:]) < length - have:
        raise _bad(where, "the file ends inside its header")
    try:
        parsed = loads_strict(raw)
    except ValueError as exc:
        raise _bad(where, f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise _bad(where, "header is not a JSON object")
    data_start = 8 + length
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(where, "__metadata__ is not a string-to-string object")
    entries = [_entry(where, name, info, data_start) for name, info in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = data_start
    for entry in entries:
        if entry.begin != cursor:
            kind = "overlapping" if entry.begin < cursor else "a hole before"
            raise _bad(where, f"{kind} byte range of tensor '{entry.name}'")
        cursor = entry.end
    if cursor != file_size:
        raise _bad(where, f"data section ends at byte {cursor} but the file has {file_size} bytes")
    return SafetensorsHeader(path, data_start, {e.name: e for e in entries}, metadata)


def _entry(where: str | os.PathLike[str], name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _bad(where, f"entry '{name}' is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype_name not in DTYPES:
        raise _bad(where, f"tensor '{name}' has unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(where, f"tensor '{name}' has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _bad(where, f"tensor '{name}' has invalid data_offsets {offsets!r}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise _bad(where, f"tensor '{name}' spans {offsets[1] - offsets[0]} bytes, its shape needs {expected}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
