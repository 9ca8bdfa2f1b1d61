"""Metrics computed by several threads of one process at once (sweep trials evaluating together)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from trainer_core.tasks._common import score


def test_threads_scoring_at_once_each_get_their_own_result() -> None:
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, size=64 + i), rng.integers(0, 2, size=64 + i)) for i in range(24)]
    expected = [float(np.mean(p == r)) for p, r in cases]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda case: score(["accuracy", "f1"], *case)["accuracy"], cases))
    assert got == expected
