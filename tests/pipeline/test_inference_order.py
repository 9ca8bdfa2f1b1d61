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


def test_the_warm_up_imports_at_the_lowest_priority_in_its_own_thread_only(tmp_path, monkeypatch) -> None:
    """The train stage's warm-up must not compete with the ranks: nice 19 for its thread, not for the process."""
    import os
    import sys
    import threading

    from stages import inference

    (tmp_path / "warm_probe.py").write_text(
        "import os, threading, time\nNICE = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())\n"
        "time.sleep(0.5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(inference, "WARM_MODULES", ("no_such_module_here", "warm_probe"))
    monkeypatch.delitem(sys.modules, "warm_probe", raising=False)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = inference.warm_up()
    inference.wait_for_warm_up()  # what scoring does first
    assert not thread.is_alive()
    assert sys.modules["warm_probe"].NICE == 19  # imported, after a module that is not there, at nice 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    monkeypatch.setattr(inference, "WARM_MODULES", ("warm_probe",))
    assert inference.warm_up() is None  # all imported already: no thread
