"""Stage 4: the task's metrics on the validation split, with the finished model → MetricsRef."""

from __future__ import annotations

from prefect import task

from stages.caching import begin_stage, cache_key_fn, single_writer, stage_logger
from stages.inference import BF16_NOTE, by_length, inference_trainer
from stages.refs import DatasetRef, MetricsRef, ModelRef, file_sha256, write_json_atomic
from stages.schema import PathsConfig

NAME = "evaluate"
CODE = ("stages.evaluate", "trainer_core")
SPLIT = "validation"


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
@single_writer(NAME, CODE)
def evaluate(model: ModelRef, data: DatasetRef, paths: PathsConfig, bf16_full_eval: bool = False) -> MetricsRef:
    """Loss and task metrics of `model` on the validation split of `data` (and on each extra validation split,
    as <name>_<metric>); with bf16_full_eval, in bf16 weights."""
    import datasets

    out = begin_stage(NAME, {"model": model, "data": data, "paths": paths, "bf16_full_eval": bf16_full_eval}, CODE)
    trainer = inference_trainer(model, data, out, bf16_full_eval)
    splits = datasets.load_from_disk(data.dataset_dir)
    metrics: dict[str, float] = {}
    try:
        # validation, then the named extra splits (validation_<name>: MNLI's matched / mismatched)
        for split in [SPLIT, *sorted(s for s in splits if s.startswith(f"{SPLIT}_"))]:
            rows, _ = by_length(splits[split], trainer.task)  # metrics ignore row order
            prefix = split.removeprefix(SPLIT).lstrip("_")
            for key, value in trainer.evaluate(rows, metric_key_prefix="eval").items():
                name = key.removeprefix("eval_")
                metrics[f"{prefix}_{name}" if prefix else name] = float(value)
    finally:
        trainer.cleanup()
    write_json_atomic(out / "metrics.json", {"split": SPLIT, "metrics": metrics, "model": model.fingerprint})
    ref = MetricsRef(
        path=str(out / "metrics.json"),
        metrics=metrics,
        split=SPLIT,
        num_samples=data.num_rows[SPLIT],
        fingerprint=file_sha256(out / "metrics.json"),
    )
    ref.save(out / "ref.json")
    stage_logger().info("evaluate: %s%s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), BF16_NOTE[bf16_full_eval])
    return ref

