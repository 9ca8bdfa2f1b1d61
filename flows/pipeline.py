"""The finetune flow: six cached stages, one MLflow run.

    from flows.pipeline import finetune
    report = finetune(["task=glue", "trainer.learning_rate=3e-5"])

The parameters are Hydra overrides, so a scheduled deployment run is exactly the CLI run. Use
`python -m flows.finetune` from a shell: it sets the environment up before Prefect is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import runtime
from flows.config import composed
from stages import lineage
from stages.batch_plan import BatchGeometry, batch_plan
from stages.evaluate import evaluate
from stages.predict import predict
from stages.prepare_data import prepare_data
from stages.register import register
from stages.run_artifacts import log_classification_report, log_datasets
from stages.tracking import client, end_run, log_metrics, open_run, tracking_uri
from stages.train import concurrency_tags, should_retry, train


def _run(stage, *args: Any, report: dict[str, str], storage: Any, seconds: dict[str, float] | None = None,
         **kwargs: Any) -> Any:
    """Call a stage task, note whether Prefect served it from cache and how long it took, return its result
    (raising on failure). `storage`: where its record persists (paths.results, flows/runtime.result_storage)."""
    started = time.monotonic()
    state = stage.with_options(result_storage=storage)(*args, return_state=True, **kwargs)
    result = state.result()  # raises the stage's exception if it failed
    report[stage.name] = "cached" if state.name == "Cached" else "ran"
    if seconds is not None:
        seconds[stage.name] = round(time.monotonic() - started, 2)
    return result


# No log_prints: `datasets` fingerprints map functions with dill, whose `dis.dis` output goes through print and
# would land in the log as bytecode. The flow and its stages log through their loggers.
@flow(name="finetune")
def finetune(overrides: list[str] | None = None, parent_run_id: str | None = None,
             register_model: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate, predict and register, as configured by conf/ plus these Hydra overrides.

    A sweep trial (flows/sweep.py) passes the sweep's MLflow run as `parent_run_id` (its run nests under it) and
    `register_model=False`: the sweep registers the best trial from the refs in the report.
    """
    from flows import sweep

    if sweep.is_sweep(overrides or []):  # the finetune/sweep deployment: the sweep runs as a subflow of this run
        return sweep.finetune_sweep()(list(overrides or []))
    started = time.monotonic()
    cfg = composed(overrides or [])
    # paths.results from this run's config, also where no CLI set the environment (a worker's deployment run)
    storage = runtime.result_storage(cfg.paths.root, cfg.paths.results)
    logger = get_run_logger()
    for key, choice in cfg.auto.items():
        logger.info("%s=auto resolved to %s", key, choice)
    nested = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    run = open_run(cfg, flow_run_id=str(flow_run.get_id() or ""), extra_tags=nested)
    stages: dict[str, str] = {}
    times: dict[str, float] = {}
    timed = functools.partial(_run, report=stages, seconds=times, storage=storage)
    try:
        data = timed(prepare_data, cfg.task, cfg.model, cfg.paths)
        log_datasets(run, data, cfg.task)
        plan = timed(batch_plan, data, BatchGeometry.of(cfg.trainer, cfg.hardware), cfg.paths)
        trainer = train.with_options(retries=cfg.stages.train_retries, retry_delay_seconds=cfg.stages.retry_delay_seconds,
                                     retry_condition_fn=should_retry,  # a divergence would only diverge again
                                     tags=concurrency_tags())
        # bf16_full_eval is the scoring stages' alone: off for the train stage, so its key (and cache) ignores it
        training = dataclasses.replace(cfg.trainer, bf16_full_eval=False)
        model = timed(trainer, cfg.task, cfg.model, training, cfg.hardware, data, plan, cfg.paths, run, peft=cfg.peft)
        full_eval = cfg.trainer.bf16_full_eval
        metrics = timed(evaluate, model, data, cfg.paths, full_eval)
        predictions = timed(predict, model, data, cfg.task.test_has_labels, cfg.paths, full_eval)
        final = {f"validation_{k}": v for k, v in metrics.metrics.items()}
        final.update({f"test_{k}": v for k, v in predictions.metrics.items()})
        log_metrics(run, final, step=model.global_step)
        client(run.tracking_uri).log_artifact(run.run_id, predictions.path, "predictions")
        log_classification_report(run, predictions.path, list(cfg.task.label_names))
        version = None
        if register_model:
            version = timed(register, model, metrics, data, cfg.task, cfg.registry, tracking_uri(cfg), cfg.paths, run)
            lineage.record(run, version, cfg, list(overrides or []))
    except BaseException:
        end_run(run, "FAILED")
        raise
    end_run(run, "FINISHED")
    report = {
        "mlflow_run_id": run.run_id,
        "tracking_uri": run.tracking_uri,
        "model_name": version.name if version else None,
        "model_version": version.version if version else None,
        "aliases": version.aliases if version else [],
        "metrics": final,
        "global_step": model.global_step,
        "stages": stages,
        "stage_seconds": times,
        "run_dir": model.run_dir,
        "predictions": predictions.path,
        "seconds": round(time.monotonic() - started, 1),
    }
    if not register_model:  # what registering it later takes (flows/sweep.py)
        report["refs"] = {"model": model.model_dump(mode="json"), "metrics": metrics.model_dump(mode="json"),
                          "data": data.model_dump(mode="json"), "run": run.model_dump(mode="json")}
    _publish(report)
    logger.info("finetune: %s", report)
    return report


def _publish(report: dict[str, Any]) -> None:
    """A Prefect artifact with the final metrics, the model version and a link to the MLflow run."""
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in report["metrics"].items())
    link = report["tracking_uri"]
    if link.startswith("http"):
        link = f"[{report['mlflow_run_id']}]({link.rstrip('/')}/#/runs/{report['mlflow_run_id']})"
    else:
        link = f"`{report['mlflow_run_id']}` in `{link}` (open with `mlflow ui --backend-store-uri {link}`)"
    title = f"{report['model_name']} v{report['model_version']}" if report["model_name"] else "not registered"
    markdown = (
        f"# finetune: {title}\n\n"
        f"Aliases: {', '.join(report['aliases']) or 'none'} · MLflow run: {link}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        f"Stages: {', '.join(f'{k} ({v})' for k, v in report['stages'].items())}\n"
    )
    create_markdown_artifact(markdown=markdown, key="finetune-report", description="Final metrics of the finetune flow")
