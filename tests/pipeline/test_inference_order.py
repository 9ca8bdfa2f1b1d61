"""Inference runs on rows sorted by length; predictions must come back in the split's own order."""

from __future__ import annotations

import datasets
import numpy as np

from stages.inference import by_length


def test_by_length_sorts_and_restores() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=50)
    rows = datasets.Dataset.from_dict({"input_ids": [[7] * int(n) for n in lengths], "row_id": list(range(50))})
    ordered, restore = by_length(rows)
    assert [len(x) for x in ordered["input_ids"]] == sorted(lengths.tolist())
    # something computed per sorted row, put back through `restore`, lines up with the original rows
    per_sorted_row = np.asarray(ordered["row_id"])
    assert per_sorted_row[restore].tolist() == list(range(50))
