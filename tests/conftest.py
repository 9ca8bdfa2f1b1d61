"""Shared test set-up: no network, ever; real servers on loopback when a test asks for one.

Fixtures every tier may use (the functions behind them live in tests/pipeline/helpers.py):
    run_cli        `python -m flows.finetune <overrides>` in a subprocess, as a user runs it
    run_module     `python -m <module> <args>` from the repository root (flows.registry, flows.predict, ...)
    glue_folder    glue_folder(rows_per_split=96): a fresh folder laid out like the nyu-mll/glue Hub repo
    prefect_server a real Prefect server on loopback, one per session
"""

from __future__ import annotations

import os
from pathlib import Path

# Before any Hugging Face import: the tests must never reach the Hub.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_EVALUATE_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    TOKENIZERS_PARALLELISM="false",
)
# The flows' default precision is auto (bf16 on a CPU with native bf16): the tests compare runs bit for bit and
# with the Hugging Face Trainer, in fp32, whatever the machine. Tests of auto ask for it by name.
os.environ["FINETUNE_MIXED_PRECISION"] = "no"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def run_cli():
    from tests.pipeline.helpers import run_cli

    return run_cli


@pytest.fixture(scope="session")
def run_module():
    from tests.pipeline.helpers import run_module

    return run_module


@pytest.fixture(scope="session")
def glue_folder(tmp_path_factory):
    """A factory: each call writes a new GLUE-like folder (mrpc and sst2, test labels -1) and returns it."""
    from tests.pipeline.helpers import write_glue_folder

    def make(rows_per_split: int = 96, seed: int = 0) -> Path:
        return write_glue_folder(tmp_path_factory.mktemp("data") / "glue", rows_per_split=rows_per_split, seed=seed)

    return make


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback, shared by the tests that run flows against one."""
    from tests.pipeline.helpers import PrefectServer

    with PrefectServer(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server
