"""The registered version's link to the best checkpoint's LoggedModel (load_best_model_at_end), against a real
`mlflow server`: the checkpoints uploaded as the train stage uploads them, the version created as the register
stage creates it (the whole flow, resumed on another machine, is tests/tracking/test_resume_elsewhere.py's)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest

from stages import checkpoint_store as store
from stages import register
from stages.refs import ModelRef
from stages.tracking import MetricShipper, RunInfo, client
from tests.tracking.test_checkpoint_store import _commit, _metrics_file

log = logging.getLogger("tests.tracking")


def _trained(run_dir: Path, load_best: bool, best: int) -> ModelRef:
    (run_dir / "final").mkdir(parents=True)
    best_path = f"/first-machine/run/checkpoints/step-{best:08d}"  # as trainer_core records it, absolute
    (run_dir / "final" / "train_result.json").write_text(json.dumps({"global_step": 4, "best_model_checkpoint":
                                                                     best_path}))
    (run_dir / "spec.json").write_text(json.dumps({"args": {"load_best_model_at_end": load_best}}))
    return ModelRef(path=str(run_dir / "final"), fingerprint="f", run_dir=str(run_dir),
                    spec_path=str(run_dir / "spec.json"), global_step=4, training_loss=0.5)


@pytest.mark.parametrize("load_best", [True, False])
def test_the_version_links_to_the_best_checkpoint_only_with_load_best_model_at_end(mlflow_server, tmp_path,
                                                                                   load_best):
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    mlflow_client = client(mlflow_server.url)
    experiment = mlflow_client.create_experiment(f"link-{uuid.uuid4().hex[:8]}")
    run = RunInfo(run_id=mlflow_client.create_run(experiment).info.run_id, tracking_uri=mlflow_server.url,
                  experiment_id=experiment)
    run_dir = tmp_path / "run"
    _metrics_file(run_dir, range(1, 5))
    uploader = store.CheckpointUploader(run, "key-l", run_dir, log, MetricShipper(run)).start()
    for step in (2, 4):
        _commit(run_dir, step, best=2)
    uploader.close()
    best = next(m for m in store.checkpoint_models(mlflow_client, experiment, "key-l") if store._step_of(m) == 2)

    model_id = register._best_checkpoint_model_id(mlflow_client, _trained(run_dir, load_best, best=2), run)
    if not load_best:  # the registered weights are the last step's: no checkpoint stands for them
        assert model_id is None
        return
    assert model_id == best.model_id
    name = f"linked-{uuid.uuid4().hex[:6]}"
    # the source is the registered package in the run's artifacts, as the register stage logs it (an mlflow server
    # refuses it with model_id=, which names another resource)
    source = f"{mlflow_client.get_run(run.run_id).info.artifact_uri}/model"
    version = register._create_version(mlflow_client, name, source, run.run_id, {})
    for _ in range(2):
        register._link_checkpoint(mlflow_client, model_id, name, str(version.version))
    linked = mlflow_client.get_logged_model(model_id)
    assert [(e["name"], str(e["version"])) for e in json.loads(linked.tags[MLFLOW_MODEL_VERSIONS])] == [
        (name, str(version.version))]  # once, however often it is linked
    assert [(m.key, m.step, m.value) for m in linked.metrics] == [("eval_loss", 2, 1.0)]  # what it was chosen on
