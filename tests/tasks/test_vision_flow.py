"""The whole flow for the vision families, as a user runs it: generated data in the Hub layouts, a tiny
random model, `python -m flows.finetune ...`, then the registered model loaded in a fresh process."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.pipeline.helpers import REPO, report
from tests.tasks.vision_data import scene, tinted, write_scene_parse

pytestmark = pytest.mark.integration
SHORT = ["trainer.max_steps=10", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
         "trainer.logging_steps=5", "trainer.save_steps=10", "trainer.warmup_steps=0", "registry.champion_threshold=0"]

PREDICT = """
import json, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps(model.predict([sys.argv[3]]).to_dict(orient="records")))
"""


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def _predict_fresh(root: Path, name: str, image_file: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", PREDICT, f"sqlite:///{root}/mlflow.db", f"models:/{name}@candidate",
                           str(image_file)], cwd=REPO, capture_output=True, text=True, timeout=300)
    _ok(done)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _registered(root: Path, rep: dict, metrics: list[str]) -> MlflowClient:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(rep["mlflow_run_id"])
    for key in metrics:
        assert key in run.data.metrics, sorted(run.data.metrics)
    version = client.get_model_version_by_alias(rep["model_name"], "candidate")
    assert int(version.version) == int(rep["model_version"])
    return client


def test_digits_on_tiny_vit(run_cli, tmp_path):
    root = tmp_path / "state"  # loader=digits: sklearn's real digits read directly, no folder step
    _ok(run_cli(["task=digits", "model=tiny_vit", "task.max_train_samples=240", "task.max_eval_samples=30",
                 "task.max_predict_samples=30", *SHORT, f"paths.root={root}"]))
    rep = report(root)
    _registered(root, rep, ["validation_accuracy", "validation_top5_accuracy", "test_accuracy", "validation_loss"])
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert len(rows) == 30 and [r["row_id"] for r in rows] == list(range(30))
    assert {r["label"] for r in rows} <= {str(d) for d in range(10)}
    accuracy = sum(r["label_id"] == r["true_label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(rep["metrics"]["test_accuracy"])

    image_file = tmp_path / "seven.png"
    tinted(np.random.default_rng(0), 7, 8).save(image_file)
    (prediction,) = _predict_fresh(root, rep["model_name"], image_file)
    assert prediction["label"] in {str(d) for d in range(10)} and 0.0 < prediction["score"] <= 1.0


def test_scene_parse_on_tiny_segformer(run_cli, tmp_path):
    data = write_scene_parse(tmp_path / "scene_parse_150", rows_per_split=16, num_classes=3)
    root = tmp_path / "state"
    overrides = ["task=scene_parse_150", f"task.dataset_path={data}", "task.num_labels=3",
                 "task.label_names=[red,green,blue]", "task.test_has_labels=true", "model=tiny_segformer",
                 *SHORT, f"paths.root={root}"]
    _ok(run_cli(overrides))
    rep = report(root)
    _registered(root, rep, ["validation_mean_iou", "validation_pixel_accuracy", "test_mean_iou"])
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert len(rows) == 16
    assert {(r["height"], r["width"]) for r in rows} == {(32, 32), (24, 32)}  # each mask at its image's size
    assert all(sum(r["class_areas"].values()) == r["height"] * r["width"] for r in rows)

    image_file = tmp_path / "scene.png"
    scene(random.Random(5), 3, 20, 28)[0].save(image_file)
    (prediction,) = _predict_fresh(root, rep["model_name"], image_file)
    assert Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))).size == (28, 20)
    assert sum(json.loads(prediction["class_areas"]).values()) == 20 * 28
