"""ShardSpec.take and byte runs against slices computed with torch by hand."""

from __future__ import annotations

import pytest
import torch

from shardstate import spec


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fused_qkv_with_replicated_kv_heads(tp):
    head_dim, n_q, n_kv, hidden = 3, 8, 2, 5
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (n_q, n_kv, n_kv))
    kv_chunks = min(tp, n_kv)
    s = spec.fused([("q", q.shape, tp), ("k", k.shape, kv_chunks), ("v", v.shape, kv_chunks)], tp)
    for rank in range(tp):
        kv_head = rank // (tp // kv_chunks) if tp >= n_kv else rank
        per_kv = n_kv // kv_chunks * head_dim
        expected = torch.cat([
            q[rank * n_q // tp * head_dim : (rank + 1) * n_q // tp * head_dim],
            k[kv_head * per_kv : (kv_head + 1) * per_kv],
            v[kv_head * per_kv : (kv_head + 1) * per_kv],
        ])
        assert torch.equal(s.take(rank, {"q": q, "k": k, "v": v}, torch.float32), expected)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_split_pads_with_zero_rows(tp):
    weight = torch.randn(203, 4)
    s = spec.vocab("e", weight.shape, 256, tp)
    pieces = [s.take(r, {"e": weight}, torch.float32) for r in range(tp)]
    assert all(p.shape == (256 // tp, 4) for p in pieces)
    whole = torch.cat(pieces)
    assert torch.equal(whole[:203], weight)
    assert torch.count_nonzero(whole[203:]) == 0


def test_row_split_on_dim_1():
    weight = torch.randn(6, 8)
    s = spec.split("w", weight.shape, 1, 2)
    assert s.local_shape() == (6, 4)
    assert torch.equal(s.take(1, {"w": weight}, torch.float32), weight[:, 4:])


@pytest.mark.parametrize("shape,dim,start,stop", [((6, 8), 0, 2, 5), ((6, 8), 1, 4, 8), ((3, 4, 5), 1, 1, 3),
                                                   ((6, 8), 1, 0, 8), ((7,), 0, 0, 7), ((6, 8), 0, 3, 3)])
def test_byte_runs_select_exactly_the_slice(shape, dim, start, stop):
    tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.int32).reshape(shape)
    raw = tensor.reshape(-1).view(torch.uint8)
    runs = spec.byte_runs(shape, 4, dim, start, stop)
    picked = torch.cat([raw[o : o + n] for o, n in runs]) if runs else torch.empty(0, dtype=torch.uint8)
    assert torch.equal(picked.view(torch.int32), tensor.narrow(dim, start, stop - start).reshape(-1))
    if dim == 0 or (start, stop) == (0, shape[dim]):
        assert len(runs) <= 1


def test_inconsistent_specs_are_refused():
    with pytest.raises(ValueError):
        spec.split("w", (6, 8), 1, 3)  # 8 columns do not split in 3
    with pytest.raises(ValueError):
        spec.fused([("a", (4, 2), 2), ("b", (4, 3), 2)], 2)  # parts disagree on dim 1
