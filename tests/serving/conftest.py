"""Team-mode fixtures: a real MLflow server, the served Prefect deployments, one flow run triggered through the API.

One of each per session (every flow run costs about a minute on 2 cores):
- `mlflow_server`: `mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts in a tmp folder;
- `served`: `python -m flows.serve` against the session's `prefect_server`, stopped at the end;
- `champion_run`: the nightly-glue deployment triggered through the API on the tiny model, logging to the
  MLflow server with the gate threshold at 0, so its version is the first champion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipeline.helpers import REPO, free_port, wait_http
from tests.serving.runs import GOOD, TRAIN_LIMIT


@dataclass
class MlflowServer:
    url: str
    root: Path


@pytest.fixture(scope="session")
def glue_data(glue_folder) -> Path:
    return glue_folder(rows_per_split=256)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback: SQLite backend, artifacts proxied into a tmp folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    # no job runner and one worker: the server answers in ~20 s on 2 cores instead of ~70 s
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}", timeout_s=180, proc=proc)
        yield MlflowServer(f"http://127.0.0.1:{port}", root)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def prefect_client(api_url: str, home: Path):
    """A sync Prefect client on the test server, without touching this process's environment."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture
def served_client(served):
    """A sync Prefect client on the server that `served` serves from."""
    with prefect_client(served.api_url, served.home) as client:
        yield client


@dataclass
class Served:
    api_url: str
    root: Path
    home: Path
    log: Path


@pytest.fixture(scope="session")
def served(prefect_server, tmp_path_factory):
    """`python -m flows.serve` pointed at the test server; waits until both deployments exist."""
    root = tmp_path_factory.mktemp("served")
    home = tmp_path_factory.mktemp("prefect-client")
    log_path = root / "serve.log"
    log = open(log_path, "w")
    env = {**os.environ, "PREFECT_API_URL": prefect_server.url}
    env.pop("PREFECT_HOME", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--root", str(root), "--max-trainings", str(TRAIN_LIMIT)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with prefect_client(prefect_server.url, home) as client:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"flows.serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                names = {d.name for d in client.read_deployments()}
                if {"nightly-glue", "default", "sweep"} <= names and "being served" in log_path.read_text():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"deployments not served:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield Served(prefect_server.url, root, home, log_path)
    finally:
        _stop(proc, signal.SIGINT)  # Ctrl-C, as a user stops it: the runner pauses its schedules
        log.close()


@pytest.fixture(scope="session")
def champion_run(served, mlflow_server, glue_data):
    """The nightly-glue deployment triggered through the API; logs to the MLflow server; threshold 0 -> champion."""
    from prefect.deployments import run_deployment

    # no paths.root: a served run keeps its state under the serve process's --root
    overrides = [*GOOD, f"task.dataset_path={glue_data}", f"tracking.uri={mlflow_server.url}",
                 "registry.champion_threshold=0.0"]
    with prefect_client(served.api_url, served.home):
        flow_run = run_deployment("finetune/nightly-glue", parameters={"overrides": overrides}, timeout=540)
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.state}\n{served.log.read_text()[-4000:]}"
    )
    return flow_run
