"""The header reader agrees with the safetensors library on real files and refuses broken ones."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import open_checkpoint
from shardstate.format.safetensors_header import read_header


def test_entries_match_safetensors_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    raw = path.read_bytes()
    loaded = load_file(path)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(loaded)
    for name, entry in header.tensors.items():
        assert entry.dtype == loaded[name].dtype and entry.shape == tuple(loaded[name].shape)
        data = torch.frombuffer(bytearray(raw[entry.begin : entry.end]) or bytearray(1), dtype=torch.uint8)
        assert torch.equal(data[: entry.nbytes].view(entry.dtype).reshape(entry.shape), loaded[name])


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
BAD_HEADERS = {
    "length past end": (GOOD, bytes(8), 10_000),
    "length over limit": (GOOD, bytes(8), 200 * 1024 * 1024),
    "not utf-8": (b"\xff\xfe{}", b"", None),
    "not an object": ([1, 2], b"", None),
    "duplicate key": (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                      b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), None),
    "unknown dtype": ({"w": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None),
    "size mismatch": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None),
    "outside data": (GOOD, bytes(4), None),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), None),
    "hole": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_broken_headers_are_refused_with_the_file_name(tmp_path, case):
    header, data, length = BAD_HEADERS[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(ShardstateError) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ShardstateError, match="never unpickles"):
        open_checkpoint(tmp_path)
