"""Stage 5: predictions on the test split → PredictionsRef (a JSONL file, logged to MLflow as an artifact).

GLUE test labels are -1: such a split is predicted, not scored (task.test_has_labels=false).
"""

from __future__ import annotations

import json

from prefect import task

from flows.config import PathsConfig
from stages.caching import begin_stage, cache_key_fn, stage_logger
from stages.inference import by_length, inference_trainer
from stages.refs import DatasetRef, ModelRef, PredictionsRef, file_sha256

NAME = "predict"
CODE = ("stages.predict", "trainer_core")
SPLIT = "test"


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
def predict(model: ModelRef, data: DatasetRef, scored: bool, paths: PathsConfig) -> PredictionsRef:
    """One JSON line per test row: row_id, the input text, label, label_id, score (and the true label if scored)."""
    import datasets

    out = begin_stage(NAME, {"model": model, "data": data, "scored": scored, "paths": paths}, CODE)
    test = datasets.load_from_disk(data.dataset_dir)[SPLIT]
    inputs, restore = by_length(test if scored else test.remove_columns("labels"))
    trainer = inference_trainer(model, data, out)
    try:
        output = trainer.predict(inputs, metric_key_prefix="test")
        decoded = trainer.task.postprocess(output.predictions[restore], trainer.task_spec)
    finally:
        trainer.cleanup()
    names = data.label_names
    columns = {c: test[c] for c in ("row_id", *data.text_columns)}
    truth = test["labels"] if scored else None
    path = out / "predictions.jsonl"
    with open(path, "w") as handle:
        for i, label_id in enumerate(decoded["prediction"].tolist()):
            row = {c: values[i] for c, values in columns.items()}
            row["label"] = names[label_id] if names and isinstance(label_id, int) else label_id
            row.update(label_id=label_id, score=round(float(decoded["score"][i]), 6))
            if truth is not None:
                row["true_label"] = truth[i]
            handle.write(json.dumps(row) + "\n")
    metrics = {key.removeprefix("test_"): float(value) for key, value in output.metrics.items()}
    ref = PredictionsRef(
        path=str(path), fingerprint=file_sha256(path), num_rows=len(test), split=SPLIT, metrics=metrics
    )
    ref.save(out / "ref.json")
    stage_logger().info("predict: %d rows -> %s %s", len(test), path, metrics or "")
    return ref
