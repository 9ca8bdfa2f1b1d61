"""Stage 4: the task's metrics on the validation split, with the finished model → MetricsRef."""

from __future__ import annotations

from prefect import task

from stages.caching import begin_stage, cache_key_fn, stage_logger
from stages.inference import by_length, inference_trainer
from stages.refs import DatasetRef, MetricsRef, ModelRef, file_sha256, write_json_atomic
from stages.schema import PathsConfig

NAME = "evaluate"
CODE = ("stages.evaluate", "trainer_core")
SPLIT = "validation"


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
def evaluate(model: ModelRef, data: DatasetRef, paths: PathsConfig) -> MetricsRef:
    """Loss and task metrics of `model` on the validation split of `data`."""
    import datasets

    out = begin_stage(NAME, {"model": model, "data": data, "paths": paths}, CODE)
    trainer = inference_trainer(model, data, out)
    try:
        validation, _ = by_length(datasets.load_from_disk(data.dataset_dir)[SPLIT], trainer.task)  # metrics ignore row order
        raw = trainer.evaluate(validation, metric_key_prefix="eval")
    finally:
        trainer.cleanup()
    metrics = {key.removeprefix("eval_"): float(value) for key, value in raw.items()}
    write_json_atomic(out / "metrics.json", {"split": SPLIT, "metrics": metrics, "model": model.fingerprint})
    ref = MetricsRef(
        path=str(out / "metrics.json"),
        metrics=metrics,
        split=SPLIT,
        num_samples=data.num_rows[SPLIT],
        fingerprint=file_sha256(out / "metrics.json"),
    )
    ref.save(out / "ref.json")
    stage_logger().info("evaluate: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return ref

