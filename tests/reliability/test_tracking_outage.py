"""The MLflow server goes away in the middle of training and comes back: training goes on, its metrics wait in
metrics.jsonl and reach the run once the server answers again, each step exactly once; the flow succeeds.

The ranks park for a while after step 4 (tests/fault_tolerance/killpoints.py): the test stops the server there,
keeps it down 20 s and starts it again on the same port and store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline.helpers import FAST, REPO, free_port, wait_http

pytestmark = pytest.mark.integration
KILL_POINT = "trainer.callbacks=[{_target_:tests.fault_tolerance.killpoints.KillPoint}]"


def _start_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}", timeout_s=240, proc=proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_metrics_survive_a_tracking_outage_during_training(tmp_path) -> None:
    from mlflow import MlflowClient

    server_root, port = tmp_path / "mlflow", free_port()
    server_root.mkdir()
    server = _start_server(server_root, port)
    uri = f"http://127.0.0.1:{port}"
    root = tmp_path / "state"
    overrides = [*FAST, "trainer.logging_steps=1", "task.max_train_samples=128", "task.max_eval_samples=32",
                 "task.max_predict_samples=32", f"tracking.uri={uri}", f"paths.root={root}", KILL_POINT]
    flow = subprocess.Popen([sys.executable, "-m", "flows.finetune", *overrides], cwd=REPO, text=True,
                            env={**os.environ, "FT_KILL_AT": "step_end:4", "FT_PAUSE": "15"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in flow.stdout:
            lines.append(line)
            if "FT-MARK" in line:
                break
        _stop(server)  # the ranks are parked after step 4; they resume while the server is down
        time.sleep(20)
        server = _start_server(server_root, port)
        lines.append(flow.communicate(timeout=900)[0])
    finally:
        if flow.poll() is None:
            flow.kill()
    output = "".join(lines)
    try:
        assert flow.returncode == 0, output[-4000:]
        assert f"MLflow at {uri} does not answer" in output and f"MLflow at {uri} answers again" in output
        run_id = json.loads((root / "last_report.json").read_text())["mlflow_run_id"]
        run_dir = Path(json.loads((root / "last_report.json").read_text())["run_dir"])
        local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        client = MlflowClient(tracking_uri=uri)
        for key in ("loss", "grad_norm", "learning_rate"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            expected = [r["step"] for r in local if key in r["metrics"]]
            assert sorted(steps) == expected == list(range(1, 25)), key  # every step once
    finally:
        _stop(server)
