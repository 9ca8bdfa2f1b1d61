"""The checkpoint uploader and the resume selector against a real `mlflow server` (no training: checkpoint
folders committed with trainer_core.checkpoint, as the ranks commit them).

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/tracking/test_checkpoint_store.py -q
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest

from stages import checkpoint_store as store
from stages.tracking import MetricShipper, RunInfo, client
from trainer_core import checkpoint as ckpt

log = logging.getLogger("tests.tracking")


@pytest.fixture
def run(mlflow_server) -> RunInfo:
    """A fresh experiment and run on the server: every test sees only its own LoggedModels."""
    mlflow_client = client(mlflow_server.url)
    experiment = mlflow_client.create_experiment(f"ckpt-{uuid.uuid4().hex[:8]}")
    run_id = mlflow_client.create_run(experiment).info.run_id
    return RunInfo(run_id=run_id, tracking_uri=mlflow_server.url, experiment_id=experiment)


def _commit(run_dir: Path, step: int, best: int | None = None) -> Path:
    """checkpoints/step-N as trainer_core commits it: files, then the manifest, then the rename."""
    tmp = ckpt.begin(run_dir, step)
    (tmp / "model.safetensors").write_bytes(bytes([step]) * 4096)
    (tmp / "optimizer.pt").write_bytes(bytes([step + 1]) * 2048)
    best_path = str(ckpt.checkpoint_dir("/elsewhere/run", best)) if best else None  # another machine's path
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_model_checkpoint": best_path}))
    return ckpt.commit(tmp, config_hash="h", mlflow_run_id=None, global_step=step)


def _metrics_file(run_dir: Path, steps: range) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "metrics": {"loss": 1.0 / s, **({"eval_loss": 2.0 / s} if s % 2 == 0 else {})}}
             for s in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _steps(run: RunInfo, key: str) -> dict[int, str]:
    return {store._step_of(m): str(m.status) for m in store.checkpoint_models(client(run.tracking_uri),
                                                                              run.experiment_id, key)}


def test_each_checkpoint_is_a_ready_logged_model_with_its_eval_metrics(run, tmp_path):
    run_dir = tmp_path / "run"
    _metrics_file(run_dir, range(1, 5))
    uploader = store.CheckpointUploader(run, "key-a", run_dir, log, MetricShipper(run)).start()
    for step in (2, 4):
        _commit(run_dir, step)
    uploader.close()  # the last uploads are done when close returns

    mlflow_client = client(run.tracking_uri)
    models = store.checkpoint_models(mlflow_client, run.experiment_id, "key-a")
    assert [store._step_of(m) for m in models] == [4, 2]
    for model in models:
        step = store._step_of(model)
        folder = ckpt.checkpoint_dir(run_dir, step)
        assert str(model.status) == "READY" and model.source_run_id == run.run_id
        assert model.tags[store.KIND] == "checkpoint" and model.tags[store.STEP] == str(step)
        assert model.tags[store.MANIFEST_SHA] == store.manifest_sha(folder)
        # the step's eval metric is linked to the checkpoint (what the UI lists next to it), the loss is not
        assert [(m.key, m.step, m.value) for m in model.metrics] == [("eval_loss", step, 2.0 / step)]
    # linking did not log a second point: one per step in the run
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(run.run_id, "eval_loss")] == [(2, 1.0), (4, 0.5)]
    assert sorted(m.step for m in mlflow_client.get_metric_history(run.run_id, "loss")) == [1, 2, 3, 4]
    outputs = mlflow_client.get_run(run.run_id).outputs.model_outputs
    assert sorted((o.model_id, o.step) for o in outputs) == sorted((m.model_id, store._step_of(m)) for m in models)
    # a second uploader (a retry) finds them on the server and uploads nothing again
    again = store.CheckpointUploader(run, "key-a", run_dir, log, MetricShipper(run)).start()
    again.close()
    assert len(store.checkpoint_models(mlflow_client, run.experiment_id, "key-a")) == 2


def test_rotation_with_save_total_limit_2_is_mirrored_and_keeps_the_best(run, tmp_path):
    run_dir = tmp_path / "run"
    uploader = store.CheckpointUploader(run, "key-r", run_dir, log, save_total_limit=2).start()
    for step in (2, 4, 6, 8, 10):
        _commit(run_dir, step, best=4)
        uploader.sync()  # the uploader saw it before the next save (the real thread polls every 2 s)
        ckpt.rotate(run_dir, 2, str(ckpt.checkpoint_dir(run_dir, 4)) if step >= 4 else None)
    uploader.close()
    local = {int(p.name.removeprefix("step-")) for p in ckpt.list_checkpoints(run_dir)}
    on_server = _steps(run, "key-r")
    # transformers' rule: the newest and the best (4), which an uploader that only counted would have deleted
    assert local == {4, 10} and set(on_server) == local, (on_server, local)
    assert len(on_server) <= 2 + 1 and set(on_server.values()) == {"READY"}


def test_a_cut_upload_is_never_resumed_from(run, tmp_path):
    """Step 2 uploaded whole; step 4's upload cut after one file (PENDING); step 6 marked READY with a file
    missing (a broken server copy): the resume takes step 2, verified, and leaves nothing else behind."""
    from mlflow.entities import LoggedModelStatus

    source = tmp_path / "source"
    uploader = store.CheckpointUploader(run, "key-c", source, log).start()
    _commit(source, 2)
    uploader.close()
    mlflow_client = client(run.tracking_uri)
    for step, status in ((4, None), (6, LoggedModelStatus.READY)):
        folder = _commit(source, step)
        tags = {store.KIND: "checkpoint", store.CONTENT_KEY: "key-c", store.STEP: str(step),
                store.MANIFEST_SHA: store.manifest_sha(folder)}
        model = mlflow_client.create_logged_model(run.experiment_id, name=f"cut-{step}", source_run_id=run.run_id,
                                                  tags=tags)
        mlflow_client.log_model_artifact(model.model_id, str(folder / ckpt.MANIFEST))
        mlflow_client.log_model_artifact(model.model_id, str(folder / "model.safetensors"))  # optimizer.pt never
        if status is not None:
            mlflow_client.finalize_logged_model(model.model_id, status)
    assert _steps(run, "key-c") == {6: "READY", 4: "PENDING", 2: "READY"}

    elsewhere = tmp_path / "elsewhere"  # another machine: an empty run folder
    found = store.fetch_newest(run, "key-c", elsewhere, log)
    assert found is not None
    model, path = found
    assert store._step_of(model) == 2 and path == ckpt.checkpoint_dir(elsewhere, 2)
    assert ckpt.verify(path) is None and ckpt.find_resumable(elsewhere) == path
    assert sorted(p.name for p in (elsewhere / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_finished_runs_checkpoints_are_not_a_resume_point(run, tmp_path):
    """`reproduce=` re-runs a registered version's config against the same server: it must train from step 0,
    not resume from the last checkpoint of the run it reproduces."""
    uploader = store.CheckpointUploader(run, "key-f", tmp_path / "source", log).start()
    _commit(tmp_path / "source", 2)
    uploader.close()
    assert store.fetch_newest(run, "key-f", tmp_path / "killed-elsewhere", log) is not None  # RUNNING: resumable
    client(run.tracking_uri).set_terminated(run.run_id, status="FINISHED")
    assert store.fetch_newest(run, "key-f", tmp_path / "again", log) is None
    assert not (tmp_path / "again" / "checkpoints").exists()
