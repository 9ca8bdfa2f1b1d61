"""Resume anywhere: a flow SIGKILLed mid-training on "machine A" is run again, the same command, on "machine B"
(a new, empty paths.root; A's folder deleted) against the same `mlflow server`: B finds A's checkpoint on the
tracking server by the train stage's content key, downloads and verifies it, and its ranks resume from it.

One module-scoped scenario (two tiny flows, the session's uninterrupted reference running beside the killed one):
  - B's weights are torch.equal to the uninterrupted reference's;
  - B logs one line saying it resumed from the tracking server; its MLflow run is tagged with A's run and the
    checkpoint's LoggedModel; no step is logged twice in either run, and B logs only the steps after it;
  - each checkpoint's LoggedModel lists the eval metrics of its step; the server keeps save_total_limit of them;
  - with load_best_model_at_end, B's registered version links the best checkpoint's LoggedModel (trainer_core
    records the best checkpoint in B's own folder, whichever machine wrote it).

The kill lands after step 17 (checkpoint 12 committed and READY on the server), as in
tests/fault_tolerance/test_flow_retry.py; here the whole flow process tree dies, not only the ranks. The flows
run from a snapshot of the source tree, as there: the content key covers the code, and an edit in the checkout
between the two runs would send B to another key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages import checkpoint_store as store
from tests.fault_tolerance.conftest import assert_same_weights, kill_tree
from tests.fault_tolerance.test_flow_retry import _snapshot
from tests.pipeline.helpers import report
from tests.tracking.kill_scenario import (
    KILL_AT,
    KILL_STEP,
    LOGGING_STEPS,
    MAX_STEPS,
    OVERRIDES,
    SAVE_STEPS,
    checkpoints,
    final_weights,
    flow,
    ready_checkpoint,
    steps,
    wait_for,
)

pytestmark = pytest.mark.integration
MODEL_NAME = "resume-elsewhere"


@pytest.fixture(scope="module")
def scenario(mlflow_server, uninterrupted, tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("resume-elsewhere")
    machine_a, machine_b, once = tmp / "a", tmp / "b", tmp / "parked.once"
    repo = _snapshot(tmp / "repo")
    server = [f"tracking.uri={mlflow_server.url}", f"registry.model_name={MODEL_NAME}"]
    mlflow_client = MlflowClient(mlflow_server.url)
    known = {m.model_id for m in checkpoints(mlflow_client)}

    killed = flow(repo, [*OVERRIDES, *server, f"paths.root={machine_a}"],
                  env={"FT_KILL_AT": KILL_AT, "FT_KILL_ONCE": str(once), "FT_PAUSE": "300"})
    try:
        wait_for(once.exists, 600, f"machine A's rank to park after step {KILL_STEP}")
        first = wait_for(lambda: ready_checkpoint(mlflow_client, SAVE_STEPS, known), 60,
                         "checkpoint 12 to be READY on the server")
        wait_for(lambda: 16 in steps(mlflow_client, first.source_run_id, "loss"), 60, "A's step 16 in MLflow")
        assert kill_tree(killed.pid)  # machine A is gone: the flow, its Prefect API, its ranks
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            kill_tree(killed.pid)
    shutil.rmtree(machine_a)  # nothing of A's paths.root survives

    resumed = flow(repo, [*OVERRIDES, *server, f"paths.root={machine_b}"])
    output = resumed.communicate(timeout=900)[0]
    (tmp / "machine_b.log").write_text(output)
    assert resumed.returncode == 0, output[-6000:]
    return {"output": output, "b": machine_b, "ref": uninterrupted, "client": mlflow_client, "first": first}


def _ours(scenario) -> list:
    """The checkpoint LoggedModels of A's and B's runs (test_two_workers trains the same content key)."""
    runs = {scenario["first"].source_run_id, report(scenario["b"])["mlflow_run_id"]}
    key = scenario["first"].tags[store.CONTENT_KEY]
    return [m for m in checkpoints(scenario["client"]) if m.tags[store.CONTENT_KEY] == key and m.source_run_id in runs]


def test_killed_on_one_machine_resumes_on_another_from_the_tracking_server(scenario):
    output, machine_b, mlflow_client, first = scenario["output"], scenario["b"], scenario["client"], scenario["first"]
    rep = report(machine_b)
    run_dir = Path(rep["run_dir"])
    assert output.count("resumed from the tracking server") == 1, output[-6000:]
    assert f"Resuming from checkpoint {run_dir / 'checkpoints' / f'step-{SAVE_STEPS:08d}'}" in output
    assert_same_weights(final_weights(run_dir), scenario["ref"].weights())

    run_b = mlflow_client.get_run(rep["mlflow_run_id"])
    run_a = first.source_run_id
    assert run_a != run_b.info.run_id
    assert run_b.data.tags[store.RESUMED_FROM_RUN] == run_a
    assert run_b.data.tags[store.RESUMED_FROM_CHECKPOINT] == first.model_id
    # every step once per run: A up to its kill, B only after the checkpoint it resumed from
    loss_a, loss_b = steps(mlflow_client, run_a, "loss"), steps(mlflow_client, run_b.info.run_id, "loss")
    assert sorted(loss_a) == list(range(LOGGING_STEPS, KILL_STEP, LOGGING_STEPS)), loss_a
    assert sorted(loss_b) == list(range(SAVE_STEPS + LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS)), loss_b
    assert sorted(steps(mlflow_client, run_b.info.run_id, "eval_loss")) == [MAX_STEPS]


def test_each_checkpoint_on_the_server_lists_its_eval_metrics(scenario):
    mlflow_client, rep = scenario["client"], report(scenario["b"])
    models = {int(m.tags[store.STEP]): m for m in _ours(scenario)}
    # A's checkpoint 12 and B's 24, READY, within save_total_limit=2
    assert sorted(models) == [SAVE_STEPS, MAX_STEPS] and {str(m.status) for m in models.values()} == {"READY"}
    assert models[MAX_STEPS].source_run_id == rep["mlflow_run_id"]
    for step, model in models.items():
        run_id = model.source_run_id
        eval_loss = [m for m in mlflow_client.get_metric_history(run_id, "eval_loss") if m.step == step]
        assert [(m.key, m.step, m.value) for m in model.metrics if m.key == "eval_loss"] == [
            ("eval_loss", step, eval_loss[0].value)]


def test_the_version_registered_on_b_links_the_best_checkpoint(scenario):
    """load_best_model_at_end: B's final weights are the best checkpoint's, which B's trainer_core found in its
    own run folder (A's checkpoint 12 downloaded, or B's 24); the version names that checkpoint's LoggedModel."""
    mlflow_client, rep = scenario["client"], report(scenario["b"])
    result = json.loads((Path(rep["run_dir"]) / "final" / "train_result.json").read_text())
    best = Path(result["best_model_checkpoint"])
    assert best.parent == Path(rep["run_dir"]) / "checkpoints", best  # B's folder, not machine A's path
    best_step = int(best.name.removeprefix("step-"))
    (model,) = [m for m in _ours(scenario) if int(m.tags[store.STEP]) == best_step]
    assert model.tags[store.MANIFEST_SHA] == store.manifest_sha(best)
    version = mlflow_client.get_model_version(MODEL_NAME, rep["model_version"])
    assert version.tags["best_checkpoint_model_id"] == model.model_id
    linked = json.loads(mlflow_client.get_logged_model(model.model_id).tags["mlflow.modelVersions"])
    assert {"name": MODEL_NAME, "version": str(version.version)} in [
        {"name": e["name"], "version": str(e["version"])} for e in linked]
