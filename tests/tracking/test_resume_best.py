"""A resume from the tracking server whose best checkpoint could not be fetched the first time (the server went
away between the two downloads): the next attempt, which finds the newest checkpoint already in its run folder,
fetches the best one then, so load_best_model_at_end has it at the end of training (SQLite store, no server)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from stages import checkpoint_store as store
from stages.tracking import RunInfo, client
from stages.train import _resume_from_server
from trainer_core import checkpoint as ckpt

log = logging.getLogger("tests.tracking")


def _commit(run_dir: Path, step: int, best: int) -> Path:
    tmp = ckpt.begin(run_dir, step)
    (tmp / "model.safetensors").write_bytes(bytes([step]) * 4096)
    best_path = str(ckpt.checkpoint_dir("/elsewhere/run", best))  # the first machine's path
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_model_checkpoint": best_path}))
    return ckpt.commit(tmp, config_hash="h", mlflow_run_id=None, global_step=step)


def test_a_best_checkpoint_missed_by_the_first_fetch_is_fetched_by_the_next_attempt(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = client(uri)
    experiment = mlflow_client.create_experiment("resume-best", artifact_location=str(tmp_path / "artifacts"))
    killed = RunInfo(run_id=mlflow_client.create_run(experiment).info.run_id, tracking_uri=uri,
                     experiment_id=experiment)
    uploader = store.CheckpointUploader(killed, "key-b", tmp_path / "first", log)
    for step in (2, 4):  # the best is step 2
        _commit(tmp_path / "first", step, best=2)
    uploader.sync()
    retry = RunInfo(run_id=mlflow_client.create_run(experiment).info.run_id, tracking_uri=uri,
                    experiment_id=experiment)
    run_dir = tmp_path / "second"

    real = store.download

    def newest_only(model, folder, tracking_uri):  # the server answers for step 4, then goes away
        if store._step_of(model) != 4:
            raise OSError("connection reset")
        return real(model, folder, tracking_uri)

    monkeypatch.setattr(store, "download", newest_only)
    _resume_from_server(retry, "key-b", run_dir, log)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000004"]  # the ranks resume from it
    monkeypatch.setattr(store, "download", real)
    _resume_from_server(retry, "key-b", run_dir, log)  # the next attempt: its own step 4, and the best fetched now
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert ckpt.verify(ckpt.checkpoint_dir(run_dir, 2)) is None
