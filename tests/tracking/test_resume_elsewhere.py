"""Resume anywhere: a flow SIGKILLed mid-training on "machine A" is run again, the same command, on "machine B"
(a new, empty paths.root; A's folder deleted) against the same `mlflow server`: B finds A's checkpoint on the
tracking server by the train stage's content key, downloads and verifies it, and its ranks resume from it.

One module-scoped scenario (three tiny flows, the uninterrupted reference running beside the killed one):
  - B's weights are torch.equal to the uninterrupted reference's;
  - B logs one line saying it resumed from the tracking server; its MLflow run is tagged with A's run and the
    checkpoint's LoggedModel; no step is logged twice in either run, and B logs only the steps after it;
  - each checkpoint's LoggedModel lists the eval metrics of its step; the server keeps save_total_limit of them.
Not load_best_model_at_end: trainer_core records the best checkpoint as an absolute path of machine A, which B
cannot load (the registered version's link to the best checkpoint is tests/tracking/test_register_link.py's).

The kill lands after step 17 (checkpoint 12 committed and READY on the server), as in
tests/fault_tolerance/test_flow_retry.py; here the whole flow process tree dies, not only the ranks. The flows
run from a snapshot of the source tree, as there: the content key covers the code, and an edit in the checkout
between the two runs would send B to another key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stages import checkpoint_store as store
from tests.fault_tolerance.conftest import assert_same_weights, kill_tree
from tests.fault_tolerance.test_flow_retry import _snapshot
from tests.pipeline.helpers import FAST, report

pytestmark = pytest.mark.integration
OVERRIDES = [*FAST, "trainer.eval_strategy=steps", "trainer.eval_steps=12",
             "trainer.callbacks=[{_target_:tests.fault_tolerance.killpoints.KillPoint}]"]
SAVE_STEPS, MAX_STEPS, LOGGING_STEPS = 12, 24, 4


def _flow(repo: Path, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.finetune", *overrides], cwd=repo, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoints(mlflow_client) -> list:
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    found = mlflow_client.search_logged_models(experiments) if experiments else []
    return [m for m in found if m.tags.get(store.KIND) == store.CHECKPOINT]


def _steps(mlflow_client, run_id: str, key: str) -> list[int]:
    return [m.step for m in mlflow_client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def scenario(mlflow_server, tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("resume-elsewhere")
    machine_a, machine_b, ref_root, once = tmp / "a", tmp / "b", tmp / "ref", tmp / "parked.once"
    repo = _snapshot(tmp / "repo")
    server = [f"tracking.uri={mlflow_server.url}"]
    mlflow_client = MlflowClient(mlflow_server.url)
    known = {m.model_id for m in _checkpoints(mlflow_client)}

    ref = _flow(repo, [*OVERRIDES, f"paths.root={ref_root}"])  # its own SQLite store: nothing of it on the server
    ref_output: list[str] = []
    ref_reader = threading.Thread(target=lambda: ref_output.append(ref.communicate(timeout=900)[0]))
    ref_reader.start()
    killed = _flow(repo, [*OVERRIDES, *server, f"paths.root={machine_a}"],
                   env={"FT_KILL_AT": "step_end:17", "FT_KILL_ONCE": str(once), "FT_PAUSE": "300"})
    try:
        _wait_for(once.exists, 600, "machine A's rank to park after step 17")
        first = _wait_for(lambda: [m for m in _checkpoints(mlflow_client) if m.model_id not in known
                                   and str(m.status) == "READY" and m.tags[store.STEP] == str(SAVE_STEPS)],
                          60, "checkpoint 12 to be READY on the server")[0]
        _wait_for(lambda: 16 in _steps(mlflow_client, first.source_run_id, "loss"), 60, "A's step 16 in MLflow")
        assert kill_tree(killed.pid)  # machine A is gone: the flow, its Prefect API, its ranks
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            kill_tree(killed.pid)
    shutil.rmtree(machine_a)  # nothing of A's paths.root survives

    resumed = _flow(repo, [*OVERRIDES, *server, f"paths.root={machine_b}"])
    output = resumed.communicate(timeout=900)[0]
    ref_reader.join()
    (tmp / "machine_b.log").write_text(output)
    assert resumed.returncode == 0, output[-6000:]
    assert ref.returncode == 0, ref_output[-1][-6000:]
    return {"output": output, "b": machine_b, "ref": ref_root, "client": mlflow_client, "first": first}


def test_killed_on_one_machine_resumes_on_another_from_the_tracking_server(scenario):
    output, machine_b, mlflow_client, first = scenario["output"], scenario["b"], scenario["client"], scenario["first"]
    rep, ref_rep = report(machine_b), report(scenario["ref"])
    run_dir = Path(rep["run_dir"])
    assert output.count("resumed from the tracking server") == 1, output[-6000:]
    assert f"Resuming from checkpoint {run_dir / 'checkpoints' / f'step-{SAVE_STEPS:08d}'}" in output

    from safetensors.torch import load_file

    assert_same_weights(load_file(str(run_dir / "final" / "model.safetensors")),
                        load_file(str(Path(ref_rep["run_dir"]) / "final" / "model.safetensors")))

    run_b = mlflow_client.get_run(rep["mlflow_run_id"])
    run_a = first.source_run_id
    assert run_a != run_b.info.run_id
    assert run_b.data.tags[store.RESUMED_FROM_RUN] == run_a
    assert run_b.data.tags[store.RESUMED_FROM_CHECKPOINT] == first.model_id
    # every step once per run: A up to its kill, B only after the checkpoint it resumed from
    loss_a, loss_b = _steps(mlflow_client, run_a, "loss"), _steps(mlflow_client, run_b.info.run_id, "loss")
    assert sorted(loss_a) == list(range(LOGGING_STEPS, 17, LOGGING_STEPS)), loss_a
    assert sorted(loss_b) == list(range(SAVE_STEPS + LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS)), loss_b
    assert sorted(_steps(mlflow_client, run_b.info.run_id, "eval_loss")) == [MAX_STEPS]


def test_each_checkpoint_on_the_server_lists_its_eval_metrics(scenario):
    mlflow_client, first, rep = scenario["client"], scenario["first"], report(scenario["b"])
    key = first.tags[store.CONTENT_KEY]
    models = {int(m.tags[store.STEP]): m for m in _checkpoints(mlflow_client) if m.tags[store.CONTENT_KEY] == key}
    # A's checkpoint 12 and B's 24, READY, within save_total_limit=2
    assert sorted(models) == [SAVE_STEPS, MAX_STEPS] and {str(m.status) for m in models.values()} == {"READY"}
    assert models[MAX_STEPS].source_run_id == rep["mlflow_run_id"]
    for step, model in models.items():
        run_id = model.source_run_id
        eval_loss = [m for m in mlflow_client.get_metric_history(run_id, "eval_loss") if m.step == step]
        assert [(m.key, m.step, m.value) for m in model.metrics if m.key == "eval_loss"] == [
            ("eval_loss", step, eval_loss[0].value)]
