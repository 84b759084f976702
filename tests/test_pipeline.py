"""The layer partition against vLLM 0.32's `get_pp_indices`, as a table worked out by hand from its rules
(even split; the remainder one layer each to the stages before the last, nearest the last first;
VLLM_PP_LAYER_PARTITION overrides), and its refusals."""

from __future__ import annotations

import pytest

from shardstate.errors import ShardstateError
from shardstate.parallel.pipeline import PARTITION_ENV, layer_partition, stage_layers

# (layers, stages) -> layers per stage
TABLE = {
    (4, 1): [4],
    (4, 2): [2, 2],
    (5, 2): [3, 2],
    (3, 2): [2, 1],
    (2, 2): [1, 1],
    (6, 3): [2, 2, 2],
    (7, 3): [2, 3, 2],  # remainder 1: the stage before the last
    (8, 3): [3, 3, 2],
    (10, 4): [2, 3, 3, 2],
    (7, 4): [2, 2, 2, 1],
    (9, 4): [2, 2, 3, 2],
    (32, 5): [6, 6, 7, 7, 6],
    (3, 3): [1, 1, 1],
}


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(PARTITION_ENV, raising=False)


@pytest.mark.parametrize(("layers", "stages"), list(TABLE), ids=lambda v: str(v))
def test_partition_matches_vllm_table(layers, stages):
    partition = layer_partition(layers, stages)
    assert partition == TABLE[layers, stages]
    ranges = [stage_layers(layers, s, stages) for s in range(stages)]
    assert [len(r) for r in ranges] == partition
    assert [i for r in ranges for i in r] == list(range(layers))


def test_override_from_the_environment(monkeypatch):
    monkeypatch.setenv(PARTITION_ENV, "1,3")
    assert layer_partition(4, 2) == [1, 3]
    assert stage_layers(4, 1, 2) == range(1, 4)
    assert stage_layers(4, 0, 1) == range(4)  # PP=1 holds every layer, whatever the variable says
    monkeypatch.setenv(PARTITION_ENV, " 2, 2")  # int() as vLLM parses: spaces allowed
    assert layer_partition(4, 2) == [2, 2]


@pytest.mark.parametrize(("override", "why"), [
    ("1,2", "adding up"), ("4", "adding up"), ("1,1,2", "adding up"), ("4,0", "at least one"),
    ("5,-1", "at least one"), ("a,b", "not comma-separated"), ("", "not comma-separated"),
    ("2;2", "not comma-separated"),
])
def test_bad_partition_strings_are_refused_in_one_line(override, why):
    with pytest.raises(ShardstateError) as info:
        layer_partition(4, 2, override)
    message = str(info.value)
    assert why in message and PARTITION_ENV in message and "\n" not in message


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ShardstateError, match="PP size 3 is more than the model's 2 layers: use --pp 2"):
        layer_partition(2, 3)
