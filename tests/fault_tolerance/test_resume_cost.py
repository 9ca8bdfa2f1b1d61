"""Resume cost is O(1) in the step: resuming at a late step costs what resuming at an early one does.

A real run of a tiny model (every step logged, so metrics.jsonl and the log history are as long as they get)
with checkpoints at an early and a late step; tests/benchmarks/bench_resume.py times a fresh Trainer's resume
from each (setup: load + verify the checkpoint, truncate metrics.jsonl, position the sampler; plus the first
batch). The full-size figures (step 10 vs 990 of 1000) come from running that script.
"""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_resume import measure

pytestmark = pytest.mark.integration


def test_resume_setup_time_does_not_grow_with_the_step(tmp_path, capsys):
    result = measure(tmp_path, early=10, late=290, steps=300, repeats=3)
    with capsys.disabled():
        print(f"\nresume at step {result['early_step']}: {result['early_s'] * 1000:.1f} ms, at step "
              f"{result['late_step']}: {result['late_s'] * 1000:.1f} ms (medians of 3; all: {result['times']})")
    assert result["late_s"] <= 2 * result["early_s"] + 0.5
