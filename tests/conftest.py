"""Shared test set-up: no network, ever; real servers on loopback when a test asks for one."""

from __future__ import annotations

import os

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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback, shared by the tests that run flows against one."""
    from tests.pipeline.helpers import PrefectServer

    with PrefectServer(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server
