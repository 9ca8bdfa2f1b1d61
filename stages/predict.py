"""Stage 5: predictions on the test split → PredictionsRef (a JSONL file, logged to MLflow as an artifact).

GLUE test labels are -1: such a split is predicted, not scored (task.test_has_labels=false).
"""

from __future__ import annotations

import json

from prefect import task

from stages.caching import begin_stage, cache_key_fn, single_writer, stage_logger
from stages.inference import BF16_NOTE, by_length, inference_trainer
from stages.refs import DatasetRef, ModelRef, PredictionsRef, file_sha256
from stages.schema import PathsConfig

NAME = "predict"
CODE = ("stages.predict", "trainer_core")
SPLIT = "test"


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
@single_writer(NAME, CODE)
def predict(model: ModelRef, data: DatasetRef, scored: bool, paths: PathsConfig,
            bf16_full_eval: bool = False) -> PredictionsRef:
    """One JSON line per test example, as its task family writes it (text classification: row_id, the input
    text, label, label_id, score, and the true label if scored)."""
    import datasets

    params = {"model": model, "data": data, "scored": scored, "paths": paths, "bf16_full_eval": bf16_full_eval}
    out = begin_stage(NAME, params, CODE)
    test = datasets.load_from_disk(data.dataset_dir)[SPLIT]
    trainer = inference_trainer(model, data, out, bf16_full_eval)
    try:
        unscored = test.remove_columns([c for c in trainer.task.target_names if c in test.column_names])
        inputs, restore = by_length(test if scored else unscored, trainer.task)
        output = trainer.predict(inputs, metric_key_prefix="test")
        outputs = {name: values[restore] for name, values in output.outputs.items()}  # back to the split's order
        path = out / "predictions.jsonl"
        with open(path, "w") as handle:
            for row in trainer.task.prediction_rows(outputs, test, scored):
                handle.write(json.dumps(row) + "\n")
    finally:
        trainer.cleanup()
    metrics = {key.removeprefix("test_"): float(value) for key, value in output.metrics.items()}
    ref = PredictionsRef(
        path=str(path), fingerprint=file_sha256(path), num_rows=len(test), split=SPLIT, metrics=metrics
    )
    ref.save(out / "ref.json")
    stage_logger().info("predict: %d rows -> %s %s%s", len(test), path, metrics or "", BF16_NOTE[bf16_full_eval])
    return ref
