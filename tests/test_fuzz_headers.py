"""Property test: mutated real safetensors files are either parsed into a header that is sound (checked
here independently) or refused with ShardstateError; never another exception, a hang or a huge
allocation. SHARDSTATE_FUZZ_EXAMPLES (default 300) sets the number of cases per strategy; the
nightly-style run uses 10000."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from shardstate.errors import ShardstateError
from shardstate.format.safetensors_header import read_header

EXAMPLES = int(os.environ.get("SHARDSTATE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "real.safetensors"
    save_file({"a.weight": torch.randn(4, 3), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}, path, metadata={"format": "pt"})
    return path.read_bytes()


def check(data: bytes, path: Path) -> None:
    path.write_bytes(data)
    try:
        header = read_header(path)
    except ShardstateError as exc:
        assert str(path) in str(exc)
        return
    size = len(data)
    spans = sorted((e.begin, e.end) for e in header.tensors.values())
    for entry in header.tensors.values():
        assert header.data_start <= entry.begin <= entry.end <= size
        assert entry.end - entry.begin == math.prod(entry.shape) * entry.dtype.itemsize
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@FUZZ
@given(data=st.data())
def test_byte_mutations(original, tmp_path_factory, data):
    blob = bytearray(original)
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, header_end + 16))
        blob[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    check(bytes(blob), tmp_path_factory.mktemp("m") / "x.safetensors")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(data=st.data())
def test_semantic_mutations(original, tmp_path_factory, data):
    """Rewrite fields of a real header (dtype, shape, offsets, whole entries, the length prefix)."""
    header_len = struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8 : 8 + header_len])
    body = original[8 + header_len :]
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "duplicate", "length"]))
    length = None
    if field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F32", "BF16", "I64", "F8_E4M3", "X9", 7, None]))
    elif field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(-3, 2**40), max_size=4) | JSON_VALUES)
    elif field == "data_offsets":
        header[name]["data_offsets"] = data.draw(st.lists(st.integers(-5, 2**62), max_size=3) | JSON_VALUES)
    elif field == "entry":
        header[name] = data.draw(JSON_VALUES)
    elif field == "length":
        length = data.draw(st.integers(0, 2**64 - 1))
    text = json.dumps(header)
    if field == "duplicate" and name != "__metadata__":
        text = text[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    raw = text.encode()
    blob = struct.pack("<Q", len(raw) if length is None else length) + raw + body
    check(blob, tmp_path_factory.mktemp("s") / "x.safetensors")
