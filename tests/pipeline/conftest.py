"""Fixtures of the pipeline tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def restore_environ():
    """flows.finetune.main sets the process environment (flows/runtime.py): put it back after the test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
