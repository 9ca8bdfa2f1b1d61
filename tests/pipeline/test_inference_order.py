"""Inference runs on rows sorted by length; predictions must come back in the split's own order."""

from __future__ import annotations

import datasets
import numpy as np

from stages.inference import by_length
from trainer_core.spec import TaskSpec
from trainer_core.tasks import get_task


def test_by_length_sorts_and_restores() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=50)
    rows = datasets.Dataset.from_dict({"input_ids": [[7] * int(n) for n in lengths], "row_id": list(range(50))})
    ordered, restore = by_length(rows, get_task("text_classification")(TaskSpec()))
    assert [len(x) for x in ordered["input_ids"]] == sorted(lengths.tolist())
    # something computed per sorted row, put back through `restore`, lines up with the original rows
    per_sorted_row = np.asarray(ordered["row_id"])
    assert per_sorted_row[restore].tolist() == list(range(50))


def test_inputs_without_a_length_keep_their_order() -> None:
    rows = datasets.Dataset.from_dict({"image_bytes": [b"x"] * 5, "row_id": list(range(5))})
    ordered, restore = by_length(rows, get_task("image_classification")(TaskSpec(family="image_classification",
                                                                                columns={"image": "image"})))
    assert ordered["row_id"] == list(range(5)) and restore.tolist() == list(range(5))
