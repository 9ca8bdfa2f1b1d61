"""What the resume-anywhere tests share: the tiny run they kill after step 17, and how they watch it.

The run: FAST (24 steps, checkpoints at 12 and 24), an evaluation at each checkpoint, load_best_model_at_end,
and the KillPoint callback (tests/fault_tolerance/killpoints.py), which parks a rank after step 17 when FT_KILL_AT
says so: by then checkpoint 12 is committed and uploaded, and step 16's loss is in MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from stages import checkpoint_store as store
from tests.pipeline.helpers import FAST

OVERRIDES = [*FAST, "trainer.eval_strategy=steps", "trainer.eval_steps=12", "trainer.load_best_model_at_end=true",
             "trainer.callbacks=[{_target_:tests.fault_tolerance.killpoints.KillPoint}]"]
SAVE_STEPS, MAX_STEPS, LOGGING_STEPS, KILL_STEP = 12, 24, 4, 17
KILL_AT = f"step_end:{KILL_STEP}"


def flow(repo: Path, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m flows.finetune <overrides>` from `repo` (a snapshot of the source tree), output piped."""
    return subprocess.Popen([sys.executable, "-m", "flows.finetune", *overrides], cwd=repo, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoints(mlflow_client, experiment_names: list[str] | None = None) -> list:
    """Every checkpoint LoggedModel on the server (of these experiments, or all)."""
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()
                   if experiment_names is None or e.name in experiment_names]
    found = mlflow_client.search_logged_models(experiments) if experiments else []
    return [m for m in found if m.tags.get(store.KIND) == store.CHECKPOINT]


def ready_checkpoint(mlflow_client, step: int, known: set[str] = frozenset(),
                     experiment_names: list[str] | None = None):
    """The new READY checkpoint LoggedModel of `step`, or None."""
    return next((m for m in checkpoints(mlflow_client, experiment_names) if m.model_id not in known
                 and str(m.status) == "READY" and m.tags[store.STEP] == str(step)), None)


def steps(mlflow_client, run_id: str, key: str) -> list[int]:
    return [m.step for m in mlflow_client.get_metric_history(run_id, key)]


def final_weights(run_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))
