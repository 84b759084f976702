"""ShardSpec against slices computed with torch by hand, and every consumer of a spec (take, put, the
copies + byte runs a partial reader follows) against each other."""

from __future__ import annotations

import pytest
import torch

from shardstate import spec
from shardstate.spec import Part, ShardSpec


def by_bytes(s: ShardSpec, rank: int, sources: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rank's tensor as the sliced loader builds it: each copy's source region read as file byte runs."""
    out = torch.zeros(s.local_shape(), dtype=torch.float32)
    for c in s.copies(rank):
        raw = sources[c.source].contiguous().reshape(-1).view(torch.uint8)
        picked = torch.cat([raw[o : o + n] for o, n in spec.byte_runs(tuple(sources[c.source].shape), 4, c.src)])
        c.dest(out).copy_(picked.view(torch.float32).reshape(c.dest(out).shape))
    return out


def check_consumers(s: ShardSpec, sources: dict[str, torch.Tensor], expected: list[torch.Tensor]) -> None:
    """take == the hand-made slices == what byte runs give, for every rank; and put undoes take."""
    rebuilt = {name: torch.full_like(sources[name], float("nan")) for name in s.sources()}
    for rank in range(s.tp_size):
        taken = s.take(rank, sources, torch.float32)
        assert taken.shape == expected[rank].shape == s.local_shape()
        assert torch.equal(taken, expected[rank]), f"rank {rank}"
        assert torch.equal(by_bytes(s, rank, sources), expected[rank]), f"rank {rank} by byte runs"
        s.put(rank, taken, rebuilt)
    for name, tensor in rebuilt.items():
        assert torch.equal(tensor, sources[name]), name


def chunk(t: torch.Tensor, dim: int, n: int, i: int) -> torch.Tensor:
    return t.chunk(n, dim)[i]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fused_qkv_with_replicated_kv_heads(tp):
    head_dim, n_q, n_kv, hidden = 3, 8, 2, 5
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (n_q, n_kv, n_kv))
    kv_chunks = min(tp, n_kv)
    s = spec.fused([("q", q.shape, tp), ("k", k.shape, kv_chunks), ("v", v.shape, kv_chunks)], tp)
    expected = []
    for rank in range(tp):
        kv_head = rank // (tp // kv_chunks) if tp >= n_kv else rank
        per_kv = n_kv // kv_chunks * head_dim
        expected.append(torch.cat([
            q[rank * n_q // tp * head_dim : (rank + 1) * n_q // tp * head_dim],
            k[kv_head * per_kv : (kv_head + 1) * per_kv],
            v[kv_head * per_kv : (kv_head + 1) * per_kv],
        ]))
    check_consumers(s, {"q": q, "k": k, "v": v}, expected)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_split_pads_with_zero_rows(tp):
    weight = torch.randn(203, 4)
    s = spec.vocab("e", weight.shape, 256, tp)
    padded = torch.cat([weight, torch.zeros(53, 4)])
    check_consumers(s, {"e": weight}, [chunk(padded, 0, tp, r) for r in range(tp)])


@pytest.mark.parametrize("join_dim", [0, 1])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_multi_part_spec_split_on_dim_1(tp, join_dim):
    """Parts split on dim 1 and joined along either dim: the class of layout the first spec got wrong."""
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    s = ShardSpec((Part("a", (3, 8), 1, tp), Part("b", (3, 8), 1, tp)), tp, join_dim)
    expected = [torch.cat([chunk(a, 1, tp, r), chunk(b, 1, tp, r)], join_dim) for r in range(tp)]
    check_consumers(s, {"a": a, "b": b}, expected)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_padding_on_dim_1_is_zero(tp):
    w = torch.randn(3, 6)
    s = ShardSpec((Part("w", (3, 6), 1, tp, padded=8),), tp)
    padded = torch.cat([w, torch.zeros(3, 2)], 1)
    check_consumers(s, {"w": w}, [chunk(padded, 1, tp, r) for r in range(tp)])
    assert not s.covers_all(tp - 1)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_stacked_experts_in_vllm_layout(tp):
    """w13_weight [E, 2I/tp, H] = per expert [gate_e,r ; up_e,r]; w2_weight [E, H, I/tp]."""
    experts, inter, hidden = 3, 8, 5
    gate = [torch.randn(inter, hidden) for _ in range(experts)]
    up = [torch.randn(inter, hidden) for _ in range(experts)]
    down = [torch.randn(hidden, inter) for _ in range(experts)]
    sources = {f"x.{e}.{kind}": t for e in range(experts) for kind, t in (("w1", gate[e]), ("w3", up[e]),
                                                                         ("w2", down[e]))}
    w13 = ShardSpec((Part("x.{e}.w1", (inter, hidden), 0, tp), Part("x.{e}.w3", (inter, hidden), 0, tp)), tp,
                    experts=experts)
    w2 = ShardSpec((Part("x.{e}.w2", (hidden, inter), 1, tp),), tp, experts=experts)
    check_consumers(w13, sources, [torch.stack([torch.cat([chunk(gate[e], 0, tp, r), chunk(up[e], 0, tp, r)])
                                                for e in range(experts)]) for r in range(tp)])
    check_consumers(w2, sources, [torch.stack([chunk(down[e], 1, tp, r) for e in range(experts)])
                                  for r in range(tp)])
    assert w13.global_shape() == (experts, 2 * inter, hidden) and w13.kind == "experts"
    assert set(w13.sources()) == {f"x.{e}.w{n}" for e in range(experts) for n in (1, 3)}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_source_cut_into_regions(tp):
    """Phi-3's checkpoint qkv_proj [q; k; v] cut into q, k, v and re-joined per rank (kv replicated at tp 4)."""
    d, n_q, n_kv, hidden = 2, 4, 2, 3
    qkv = torch.randn((n_q + 2 * n_kv) * d, hidden)
    q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d])
    kv_chunks = min(tp, n_kv)
    rows = [(0, n_q * d), (n_q * d, n_kv * d), ((n_q + n_kv) * d, n_kv * d)]
    s = ShardSpec(tuple(Part("qkv", tuple(qkv.shape), 0, c, box=(r, (0, hidden)))
                        for r, c in zip(rows, (tp, kv_chunks, kv_chunks), strict=True)), tp)
    expected = [torch.cat([chunk(q, 0, tp, r), chunk(k, 0, kv_chunks, r * kv_chunks // tp),
                           chunk(v, 0, kv_chunks, r * kv_chunks // tp)]) for r in range(tp)]
    check_consumers(s, {"qkv": qkv}, expected)
    assert s.global_shape() == tuple(qkv.shape)


@pytest.mark.parametrize("shape,box", [((6, 8), ((2, 3), (0, 8))), ((6, 8), ((0, 6), (4, 4))),
                                       ((3, 4, 5), ((0, 3), (1, 2), (0, 5))), ((3, 4, 5), ((1, 2), (0, 4), (2, 3))),
                                       ((7,), ((0, 7),)), ((6, 8), ((3, 0), (0, 8)))])
def test_byte_runs_select_exactly_the_region(shape, box):
    tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.int32).reshape(shape)
    raw = tensor.reshape(-1).view(torch.uint8)
    runs = spec.byte_runs(shape, 4, box)
    picked = torch.cat([raw[o : o + n] for o, n in runs]) if runs else torch.empty(0, dtype=torch.uint8)
    assert torch.equal(picked.view(torch.int32), spec.cut(tensor, box).reshape(-1))
    if all(b == (0, n) for b, n in zip(box[1:], shape[1:], strict=True)):
        assert len(runs) <= 1  # a dim-0 slice is one read


def test_json_round_trip_and_version_1():
    s = ShardSpec((Part("x.{e}.w1", (8, 5), 0, 2), Part("x.{e}.w3", (8, 5), 0, 2)), 2, experts=3)
    assert spec.spec_from_json(spec.spec_to_json(s)) == s
    halves = (Part("qkv", (8, 3), 0, 2, box=((0, 4), (0, 3))), Part("qkv", (8, 3), 0, 2, box=((4, 4), (0, 3))))
    cut_spec = ShardSpec(halves, 2)
    assert spec.spec_from_json(spec.spec_to_json(cut_spec)) == cut_spec
    v1 = {"kind": "vocab", "tp_size": 2, "parts": [{"source": "e", "shape": [203, 4], "dim": 0, "chunks": 2,
                                                     "padded": 256}]}
    assert spec.spec_from_json(v1, version=1) == spec.vocab("e", (203, 4), 256, 2)
    with pytest.raises(ValueError, match="exactly"):
        spec.spec_from_json(v1)  # a version-1 spec in a version-2 manifest


@pytest.mark.parametrize("make", [
    lambda: spec.split("w", (6, 8), 1, 3),  # 8 columns do not split in 3
    lambda: spec.fused([("a", (4, 2), 2), ("b", (4, 3), 2)], 2),  # parts disagree on dim 1
    lambda: ShardSpec((Part("a", (4, 2), 0, 2), Part("b", (3, 2), 0, 2)), 2, join_dim=1),  # differ on dim 0
    lambda: ShardSpec((Part("q", (8, 3), box=((0, 5), (0, 3))), Part("q", (8, 3), box=((4, 4), (0, 3)))), 1),
    lambda: ShardSpec((Part("q", (8, 3), box=((6, 4), (0, 3))),), 1),  # box outside the tensor
    lambda: ShardSpec((Part("x.w1", (8, 3)),), 1, experts=2),  # stacked sources must name {e}
    lambda: ShardSpec((Part("x.{e}.w1", (8, 3)),), 1),  # and only stacked ones
    lambda: ShardSpec((Part("w", (4, 2)),), 1, join_dim=2),
    lambda: ShardSpec((Part("w", (4, 2), 0, 2, padded=3),), 2),  # padded below the size
    lambda: ShardSpec((Part("q", (8, 3), box=((0, 4), (0, 3))), Part("q", (9, 3), box=((4, 4), (0, 3)))), 1),
    lambda: ShardSpec((Part("w{e}1", (4, 2)), Part("w1{e}", (4, 2))), 1, experts=2),  # both give w11
])
def test_specs_it_cannot_express_are_refused(make):
    with pytest.raises(ValueError):
        make()


def _qkv(tp: int) -> ShardSpec:
    return spec.fused([("q", (24, 5), tp), ("k", (6, 5), min(tp, 2)), ("v", (6, 5), min(tp, 2))], tp)


def _phi3_qkv(tp: int) -> ShardSpec:
    rows, chunks = [(0, 16), (16, 8), (24, 8)], (tp, min(tp, 2), min(tp, 2))
    return ShardSpec(tuple(Part("qkv", (32, 3), 0, c, box=(r, (0, 3))) for r, c in zip(rows, chunks, strict=True)), tp)


RESHARD_LAYOUTS = {  # name -> the spec at a TP size: every kind of layout a model uses
    "replicated": lambda tp: spec.replicated("n", (6,), tp),
    "split-0": lambda tp: spec.split("w", (8, 6), 0, tp),
    "split-1": lambda tp: spec.split("w", (6, 8), 1, tp),
    "qkv, kv heads replicated": _qkv,
    "vocab padded": lambda tp: spec.vocab("e", (203, 4), 256, tp),
    "fused source (phi3)": _phi3_qkv,
    "w13 experts": lambda tp: ShardSpec((Part("x.{e}.w1", (8, 5), 0, tp), Part("x.{e}.w3", (8, 5), 0, tp)), tp,
                                        experts=3),
    "w2 experts": lambda tp: ShardSpec((Part("x.{e}.w2", (5, 8), 1, tp),), tp, experts=3),
    "dim-1 parts joined on dim 1": lambda tp: ShardSpec((Part("a", (3, 8), 1, tp), Part("b", (3, 8), 1, tp)), tp, 1),
}


@pytest.mark.parametrize("saved_tp,tp", [(1, 2), (2, 1), (4, 2), (2, 4), (1, 4), (4, 1), (8, 2), (2, 8), (4, 8)])
@pytest.mark.parametrize("layout", RESHARD_LAYOUTS)
def test_reshard_copies_rebuild_each_ranks_tensor_from_the_saved_ranks(layout, saved_tp, tp):
    """Every rank's tensor at `tp`, filled only from the saved ranks' tensors at `saved_tp` by the transfers,
    equals `take` from the whole sources (padding zero); each element comes from one saved rank."""
    saved, target = RESHARD_LAYOUTS[layout](saved_tp), RESHARD_LAYOUTS[layout](tp)
    sources = {name: torch.randn(shape) for name, shape in target.sources().items()}
    saved_tensors = [saved.take(r, sources, torch.float32) for r in range(saved_tp)]
    for rank in range(tp):
        got = torch.zeros(target.local_shape())
        filled = torch.zeros(target.local_shape(), dtype=torch.int32)
        for t in spec.reshard_copies(target, rank, saved):
            spec.cut(got, t.local).copy_(spec.cut(saved_tensors[t.saved_rank], t.saved))
            spec.cut(filled, t.local).add_(1)
        assert torch.equal(got, target.take(rank, sources, torch.float32)), rank
        assert filled.max() <= 1


def test_reshard_copies_refuse_another_parameter():
    with pytest.raises(ValueError, match="other source tensors"):
        spec.reshard_copies(spec.split("w", (8, 6), 0, 2), 0, spec.split("v", (8, 6), 0, 4))
