"""trainer_core tests: each runs as one process (helpers are in tests/trainer_core/factories.py)."""

import pytest


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    # the Trainer reads WORLD_SIZE before building its Accelerator; in-process tests are one process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yield
