"""The run's dataset inputs and classification report (stages/run_artifacts.py), against a real SQLite MLflow store."""

from __future__ import annotations

import csv

import pytest

from stages.run_artifacts import log_classification_report, log_datasets, per_class, write_classification_report


def test_per_class_counts_and_scores() -> None:
    truth, predicted = [0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 1, 0]
    matrix, rows = per_class(truth, predicted, 3)
    assert matrix == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert rows[0] == {"class": 0, "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                       "f1": pytest.approx(2 / 3), "support": 3}
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 1.0
    assert rows[2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_report_needs_scored_class_rows(tmp_path) -> None:
    unscored = [{"label_id": 1, "score": 0.9}, {"label_id": 0}]
    assert not write_classification_report(unscored, ["a", "b"], tmp_path / "none")
    assert not (tmp_path / "none").exists()
    regression = [{"label_id": 0.4, "true_label": 0.5}]
    assert not write_classification_report(regression, [], tmp_path / "none")


def test_run_gets_its_splits_as_inputs_and_the_report_as_artifacts(tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from stages.refs import DatasetRef
    from stages.schema import TaskConfig
    from stages.tracking import RunInfo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = MlflowClient(tracking_uri=uri)
    experiment = mlflow_client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run = RunInfo(run_id=mlflow_client.create_run(experiment).info.run_id, tracking_uri=uri, experiment_id=experiment)
    task = TaskConfig(name="glue", loader="hf", dataset="nyu-mll/glue", subset="mrpc", revision="abc123")
    data = DatasetRef(path=str(tmp_path), fingerprint="f" * 64, num_rows={"train": 10, "validation": 4, "test": 3},
                      input_columns=["sentence1"], vocab_size=10, tokenizer_fingerprint="t")
    log_datasets(run, data, task)
    inputs = mlflow_client.get_run(run.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["glue-test", "glue-train", "glue-validation"]
    assert {i.dataset.digest for i in inputs} == {"f" * 32}
    assert all('"path": "nyu-mll/glue"' in i.dataset.source and "mrpc" in i.dataset.source for i in inputs)
    contexts = {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"train", "validation", "test"}

    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("\n".join(
        f'{{"label_id": {p}, "true_label": {t}}}' for t, p in [(0, 0), (0, 1), (1, 1), (1, 1)]))
    assert log_classification_report(run, predictions, ["no", "yes"])
    names = sorted(a.path for a in mlflow_client.list_artifacts(run.run_id, "evaluation"))
    assert names == ["evaluation/confusion_matrix.png", "evaluation/per_class.csv"]
    local = mlflow_client.download_artifacts(run.run_id, "evaluation/per_class.csv", str(tmp_path / "dl"))
    with open(local) as handle:
        table = list(csv.DictReader(handle))
    assert [(r["class"], r["support"]) for r in table] == [("no", "2"), ("yes", "2")]
    assert float(table[0]["precision"]) == 1.0 and float(table[1]["precision"]) == pytest.approx(2 / 3)

    # a cached flow run logs the same report to its new run without rendering it again (no matplotlib)
    again = mlflow_client.create_run(experiment).info.run_id
    import stages.run_artifacts as run_artifacts

    monkeypatch.setattr(run_artifacts, "_plot", lambda *a: pytest.fail("rendered the report a second time"))
    assert log_classification_report(run.model_copy(update={"run_id": again}), predictions, ["no", "yes"])
    assert sorted(a.path for a in mlflow_client.list_artifacts(again, "evaluation")) == names
    assert [p.name for p in tmp_path.iterdir() if "evaluation" in p.name and p.is_dir()] != []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".evaluation-")]  # nothing half-written left


def test_config_hash_covers_the_trainer_but_not_where_results_go() -> None:
    from flows.config import compose
    from stages.lineage import resolved_config
    from stages.schema import stable_hash

    base = stable_hash(resolved_config(compose([])))
    assert stable_hash(resolved_config(compose(["trainer.learning_rate=3e-5"]))) != base
    assert stable_hash(resolved_config(compose(["paths.root=/elsewhere", "tracking.uri=http://127.0.0.1:5000"]))) == base



def test_a_lost_race_to_log_the_same_datasets_is_retried_and_other_errors_are_not(tmp_path, monkeypatch) -> None:
    """Flows started together log the same datasets: MLflow's store checks, then inserts, and the loser of the race
    gets the store's UNIQUE constraint error (met in tests/reliability/test_one_writer.py, not reproducible on
    demand: here the store raises it once); the retry links the datasets. Any other error is not retried."""
    import pytest
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from stages.refs import DatasetRef
    from stages.schema import TaskConfig
    from stages.tracking import RunInfo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = MlflowClient(tracking_uri=uri)
    experiment = mlflow_client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run = RunInfo(run_id=mlflow_client.create_run(experiment).info.run_id, tracking_uri=uri, experiment_id=experiment)
    task = TaskConfig(name="glue", loader="hf", dataset="nyu-mll/glue", subset="mrpc", revision="abc123")
    data = DatasetRef(path=str(tmp_path), fingerprint="f" * 64, num_rows={"train": 10, "validation": 4},
                      input_columns=["sentence1"], vocab_size=10, tokenizer_fingerprint="t")
    real, calls, failures = MlflowClient.log_inputs, [], ["(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                                          "datasets.experiment_id, datasets.name, datasets.digest"]

    def racing(self, *args, **kwargs):
        calls.append(args)
        if failures:
            raise MlflowException(failures.pop())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    log_datasets(run, data, task)
    assert len(calls) == 2
    inputs = mlflow_client.get_run(run.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["glue-train", "glue-validation"]

    failures.append("RESOURCE_DOES_NOT_EXIST: run not found")
    calls.clear()
    with pytest.raises(MlflowException, match="run not found"):
        log_datasets(run, data, task)
    assert len(calls) == 1


def test_the_confusion_matrix_is_a_whole_png_sized_for_its_classes_also_from_threads(tmp_path) -> None:
    """Served sweep trials run in threads of one process: each renders its own figure (no pyplot state)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    rows = [{"label_id": p, "true_label": t} for t, p in [(0, 0), (0, 1), (1, 1), (2, 2), (2, 0)]]

    def render(i: int):
        assert write_classification_report(rows, ["a", "b", "c"], tmp_path / f"r{i}")
        with Image.open(tmp_path / f"r{i}" / "confusion_matrix.png") as image:
            return image.format, image.size

    with ThreadPoolExecutor(6) as pool:
        shapes = list(pool.map(render, range(12)))
    assert shapes == [("PNG", (350, 350))] * 12  # max(3, 0.5 * 3 + 2) inches at 100 dpi, every one whole
