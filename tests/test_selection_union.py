"""benchmarks/selection_union.py's table: the union of neuron sets of a batch of requests."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from selection_union import layer_set, union_table  # noqa: E402


def test_union_of_disjoint_and_identical_sets():
    # 4 prompts, 2 layers, I = 8: layer 0 keeps disjoint halves in pairs, layer 1 the same half for all
    keep = torch.zeros(4, 2, 8, dtype=torch.bool)
    keep[0::2, 0, :4] = True
    keep[1::2, 0, 4:] = True
    keep[:, 1, :4] = True
    table = union_table(keep, [0], [1, 4], groups=20, seed=0)
    assert "| 1 | 0.500 |" in table and "| 4 | 1.000 |" in table
    table = union_table(keep, [1], [4], groups=5, seed=0)
    assert "| 4 | 0.500 | 0.500 / 0.500 | 0.500 |" in table
    assert "| 8 |" not in union_table(keep, [0, 1], [8], groups=1, seed=0)  # more than the prompts: no row


def test_layer_sets():
    assert layer_set("first-half", 24) == list(range(12))
    assert layer_set("all", 3) == [0, 1, 2]
    assert layer_set("2-4", 24) == [2, 3, 4]
    with pytest.raises(SystemExit, match="--layers 5-30"):
        layer_set("5-30", 24)
