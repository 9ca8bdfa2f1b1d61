"""What the sweep tests share: a tiny trial, and readers of what a sweep leaves in MLflow and Prefect's database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

TINY_TRIAL = [
    "model=tiny_bert",
    "trainer.max_steps=8",
    "trainer.per_device_train_batch_size=16",
    "trainer.save_steps=8",
    "trainer.logging_steps=4",
    "trainer.max_grad_norm=0",
    "task.max_train_samples=128",
    "task.max_eval_samples=32",
    "task.max_predict_samples=32",
]
"""A trial of a few seconds (max_grad_norm=0: a learning rate of 1e6 diverges within three steps)."""


def sweep_report(root: Path) -> dict:
    """The report of the one sweep run under root (<root>/sweeps/<name>/report.json)."""
    (path,) = sorted(root.glob("sweeps/*/report.json"))
    return json.loads(path.read_text())


def mlflow_runs(root: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def prefect_flow_runs(root: Path) -> list[dict]:
    """Every flow run in the ephemeral API's database: name, flow, state, the flow run it nests under, and when it
    started and ended (as the server recorded them)."""
    db = sqlite3.connect(root / "prefect" / "prefect.db")
    rows = db.execute(
        "select fr.id, fr.name, f.name, fr.state_type, parent.flow_run_id, fr.start_time, fr.end_time from flow_run fr "
        "join flow f on f.id = fr.flow_id left join task_run parent on parent.id = fr.parent_task_run_id"
    ).fetchall()
    db.close()
    keys = ("id", "name", "flow", "state", "parent_flow_run_id", "start_time", "end_time")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def prefect_artifact(root: Path, key: str) -> str:
    db = sqlite3.connect(root / "prefect" / "prefect.db")
    (data,) = db.execute("select data from artifact where key = ? order by created desc limit 1", (key,)).fetchone()
    db.close()
    return json.loads(data) if data.startswith('"') else data
