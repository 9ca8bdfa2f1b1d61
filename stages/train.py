"""Stage 3: train with `accelerate launch -m trainer_core.run` as a real subprocess → ModelRef.

The run folder is keyed on everything that decides the weights, so a Prefect retry (or the same command run
again after a crash) lands in the same folder and trainer_core resumes from its newest complete checkpoint.
The ranks' log lines stream into the Prefect logger; their metrics.jsonl streams into the flow's MLflow run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path

from prefect import task

from stages import checkpoint_store, inference
from stages.caching import (
    cache_key_fn,
    code_version,
    explain_miss,
    key_components,
    key_lock,
    stage_dir,
    stage_key,
    stage_logger,
)
from stages.common import resolve_model_path
from stages.launch import distributed_spec, launch_command, preflight, write_accelerate_config
from stages.refs import BatchPlanRef, DatasetRef, ModelRef, Ref, file_sha256
from stages.schema import HardwareConfig, ModelConfig, PathsConfig, PeftConfig, TaskConfig, stable_hash
from stages.tracking import MetricShipper, RunInfo
from trainer_core.args import TrainingArguments
from trainer_core.files import remove_dir
from trainer_core.spec import DISK_FULL, DIVERGED, PREEMPTED, ModelSpec, RunSpec

NAME = "train"
CODE = ("stages.train", "trainer_core", "flows.pruning")  # flows.pruning: a sweep trial's callback, run in the ranks
SHIP_EVERY_SECONDS = 5.0
STOP_GRACE_SECONDS = 60.0
"""A cancelled flow gives its ranks this long to checkpoint the step they are at before it SIGKILLs them."""
CONCURRENCY_TAG = "finetune-train"
"""Tag of the train task runs where the server holds its limit: `prefect concurrency-limit create finetune-train 1`
caps trainings per server (see `concurrency_tags`)."""


class TrainingFailed(RuntimeError):
    pass


class TrainingPreempted(TrainingFailed):
    """The ranks stopped on SIGTERM after checkpointing the step they were at: a retry resumes from it."""


class TrainingDiverged(TrainingFailed):
    """The ranks stopped at a NaN/inf loss or gradient norm (trainer.stop_on_nonfinite): a retry would diverge
    again, so the flow does not retry it (see `should_retry`)."""


class CheckpointDiskFull(TrainingFailed):
    """A checkpoint did not fit on paths.root's filesystem: a retry before space is freed fails the same way."""


def should_retry(task, task_run, state) -> bool:
    """Prefect retry_condition_fn of the train stage: retry anything but a divergence or a full disk."""
    try:
        state.result()
    except (TrainingDiverged, CheckpointDiskFull):
        return False
    except BaseException:  # noqa: BLE001 - any other failure: retry, the relaunch resumes
        return True
    return True


def build_spec(
    task: TaskConfig, model: ModelConfig, trainer: TrainingArguments, data: DatasetRef, plan: BatchPlanRef,
    run_dir: Path, run: RunInfo | None, hardware: HardwareConfig | None = None, peft: PeftConfig | None = None,
) -> RunSpec:
    model_config = dict(model.config)
    if model_config and resolve_model_path(model) is None and data.vocab_size:
        model_config["vocab_size"] = data.vocab_size  # random init: size the embeddings to our tokenizer
    return RunSpec(
        args=trainer,
        task=task.spec(),
        model=ModelSpec(
            name_or_path=resolve_model_path(model),
            config=model_config,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            dropout=model.dropout,
        ),
        dataset_dir=data.dataset_dir,
        tokenizer_dir=data.tokenizer_dir,
        plan_path=plan.path,
        output_dir=str(run_dir),
        # What a checkpoint must agree with to be resumed: same model, task and data.
        config_hash=stable_hash({"model": model, "task": task, "data": data.fingerprint,
                                 **({"peft": peft.spec()} if peft and peft.enabled else {})})[:16],  # + LoRA's
        config_components=config_components(task, model, data),
        mlflow_run_id=run.run_id if run else None,
        distributed=distributed_spec(hardware) if hardware is not None else {},
        peft=peft.spec() if peft else {},
    )


def config_components(task: TaskConfig, model: ModelConfig, data: DatasetRef) -> dict[str, str | int]:
    """The parts of the checkpoint config_hash, readable: a refused resume names the ones that differ."""
    return {
        "model": model.name,
        "model.name_or_path": str(resolve_model_path(model) or "random init"),
        "model.config": stable_hash(model)[:16],
        "task": task.name,
        "task.family": task.family,
        "num_labels": task.num_labels,
        "task.config": stable_hash(task)[:16],
        "data.fingerprint": data.fingerprint[:16],
    }


def model_ref(run_dir: Path) -> ModelRef | None:
    """The finished model of a run folder, or None while training has not completed."""
    import json

    final = run_dir / "final"
    try:
        result = json.loads((final / "train_result.json").read_text())
        fingerprint = file_sha256(final / "model.safetensors")
    except (OSError, ValueError):
        return None
    return ModelRef(
        path=str(final),
        fingerprint=fingerprint,
        run_dir=str(run_dir),
        spec_path=str(run_dir / "spec.json"),
        global_step=int(result["global_step"]),
        training_loss=float(result["training_loss"]),
        train_metrics={k: float(v) for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))},
    )


def final_problem(run_dir: Path, done: ModelRef | None) -> str | None:
    """Why run_dir's final/ is not the model this stage finished with, or None: final/ is written whole (a rename),
    so a final/ without readable weights and train_result.json, or with weights other than those the stage's
    ref.json recorded, was altered afterwards (a bad copy, bit rot, a hand edit) and must not be evaluated or
    registered."""
    final = run_dir / "final"
    if done is None:
        return f"{final} is incomplete (no readable model.safetensors and train_result.json)" if final.exists() else None
    recorded = Ref.load(run_dir / "ref.json")
    if isinstance(recorded, ModelRef) and recorded.fingerprint != done.fingerprint:
        return (f"{final / 'model.safetensors'} changed since training wrote it (SHA-256 {done.fingerprint[:12]}, "
                f"recorded {recorded.fingerprint[:12]})")
    return None


def _stream(proc: subprocess.Popen, logger, tail: deque, notes: dict[str, str]) -> None:
    """Each rank line into the stage's log; the first divergence / preemption line into `notes`."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n").split("\r")[-1].rstrip()  # keep the last frame of a progress bar
        if line:
            tail.append(line)
            logger.info(line)
            for marker in (DIVERGED, PREEMPTED, DISK_FULL):
                if marker in line:
                    notes.setdefault(marker, line[line.index(marker):])


def concurrency_tags(tag: str = CONCURRENCY_TAG) -> list[str]:
    """The train task's tags for a flow run: [tag] where the Prefect server holds a concurrency limit for it, else
    none (nothing would be capped). One read (~10 ms) spares the train stage, cached or not, a 2 s stall that hit a
    quarter of the runs measured (BENCHMARKS.md): for each tag of a task run, Prefect's task engine asks the server
    for a lease, and on a SQLite server (Prefect's default, and the command line's temporary API) that request reads
    and then writes in one deferred transaction, which loses to the task run's own events the server records at the
    same moment ("database is locked" → 503 → the client retries 2 s later; Prefect 3.8.8 and 3.9.1). The flow
    reads it once, before its train stage: a limit created later caps the train stages of the flow runs that start
    after it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(tag)
        except ObjectNotFound:
            return []
    return [tag]


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
def train(
    task: TaskConfig,
    model: ModelConfig,
    trainer: TrainingArguments,
    hardware: HardwareConfig,
    data: DatasetRef,
    plan: BatchPlanRef,
    paths: PathsConfig,
    run: RunInfo | None = None,
    peft: PeftConfig | None = None,
) -> ModelRef:
    """Launch the ranks, stream their logs and metrics, return the final model."""
    params = {"task": task, "model": model, "trainer": trainer, "hardware": hardware, "data": data,
              "plan": plan, "paths": paths, "run": run, "peft": peft}  # as Prefect's key sees them
    logger = stage_logger()
    # Not begin_stage: the run folder survives a failed attempt, its checkpoints are what a retry resumes.
    run_dir = stage_dir(paths.root, stage_key(NAME, params, CODE))
    run_dir.mkdir(parents=True, exist_ok=True)
    shipper = MetricShipper(run) if run else None
    # what the checkpoints on the tracking server are found by: the key less anything machine-local
    content_key = checkpoint_store.content_key(params, code_version(*CODE))
    with key_lock(run_dir, logger, NAME):  # one trainer per run folder, whatever the number of flows
        uploader = None
        if run and run.log_checkpoints:  # each committed checkpoint → a LoggedModel, from a thread of ours
            uploader = checkpoint_store.CheckpointUploader(run, content_key, run_dir, logger, shipper,
                                                           trainer.save_total_limit)
        done = model_ref(run_dir)
        if (problem := final_problem(run_dir, done)) is not None:
            # rebuilt, not handed on: the ranks resume from the newest complete checkpoint and write final/ again
            logger.warning("train: %s; removing it, the ranks write it again from the newest complete checkpoint",
                           problem)
            remove_dir(run_dir / "final")
            done = None
        if done is not None:
            logger.info("train: %s already holds a finished model (step %d)", run_dir, done.global_step)
            if uploader:
                uploader.start().close()  # a flow stopped before its last uploads: they happen now
        else:
            explain_miss(NAME, paths.root, key_components(params, CODE), logger)
            if run and not trainer.resume_from_checkpoint:
                _resume_from_server(run, content_key, run_dir, logger)
            try:
                if uploader:
                    uploader.start()
                done = _launch(task, model, trainer, hardware, data, plan, run_dir, run, shipper, logger, peft)
            finally:
                if uploader:
                    uploader.close()  # the last checkpoints reach the server before the stage returns
    if shipper:
        shipper.ship_within(done.metrics_path, run.outage_seconds, logger)
    done.save(run_dir / "ref.json")
    return done


def _resume_from_server(run: RunInfo, content_key: str, run_dir: Path, logger) -> None:
    """A run folder without a complete checkpoint (another machine, an empty paths.root, another worker): take
    the newest complete one the tracking server holds for this training, so the ranks resume from it."""
    from trainer_core import checkpoint as ckpt

    if (own := ckpt.find_resumable(run_dir)) is not None:
        # the best checkpoint it names (load_best_model_at_end) may have missed an earlier attempt's fetch
        checkpoint_store.fetch_best(run, content_key, run_dir, own, logger)
        return
    found = checkpoint_store.fetch_newest(run, content_key, run_dir, logger)
    if found is None:
        return
    model, path = found
    source_run = model.source_run_id or model.tags.get("mlflow_run_id", "")
    logger.info("train: resumed from the tracking server: checkpoint step %s (LoggedModel %s of run %s) placed "
                "in %s", model.tags.get(checkpoint_store.STEP), model.model_id, source_run, path)
    from stages.tracking import client

    tags = {checkpoint_store.RESUMED_FROM_RUN: source_run, checkpoint_store.RESUMED_FROM_CHECKPOINT: model.model_id,
            "resumed_from_step": model.tags.get(checkpoint_store.STEP, "")}
    for key, value in tags.items():
        client(run.tracking_uri).set_tag(run.run_id, key, value)


def _launch(task, model, trainer, hardware, data, plan, run_dir: Path, run, shipper, logger, peft=None) -> ModelRef:
    preflight(hardware, trainer.mixed_precision)
    spec = build_spec(task, model, trainer, data, plan, run_dir, run, hardware, peft)
    if trainer.resume_from_checkpoint:
        how = "warm start" if trainer.warm_start else "continue" if trainer.continue_training else "resume"
        logger.info("train: %s from %s (trainer.resume_from_checkpoint)", how, trainer.resume_from_checkpoint)
        if run:
            from stages.tracking import client

            client(run.tracking_uri).set_tag(run.run_id, "resumed_from", f"{how}: {trainer.resume_from_checkpoint}")
    (run_dir / "spec.json").write_text(spec.to_json())
    config_file = write_accelerate_config(hardware, run_dir / "accelerate.yaml", trainer.mixed_precision)
    cmd, env = launch_command(hardware, config_file, ["-m", "trainer_core.run", "--spec", str(run_dir / "spec.json")])
    logger.info("train: %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=20)
    notes: dict[str, str] = {}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,  # its own process group: we can stop every rank at once
    )
    (run_dir / "launcher.pid").write_text(str(proc.pid))
    inference.warm_up()  # what the evaluate stage imports, on CPU time the ranks leave idle
    reader = threading.Thread(target=_stream, args=(proc, logger, tail, notes), daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            try:
                proc.wait(timeout=SHIP_EVERY_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            if shipper:
                shipper.try_ship(run_dir / "metrics.jsonl", logger)
    finally:
        if proc.poll() is None:  # we are being cancelled: the ranks checkpoint this step and stop (save_on_sigterm)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        reader.join(timeout=10)
    if proc.returncode != 0 and notes.get(DIVERGED):
        raise TrainingDiverged(f"{notes[DIVERGED]} [train: accelerate launch exited with code {proc.returncode}]")
    if proc.returncode != 0 and notes.get(DISK_FULL):
        raise CheckpointDiskFull(f"train: {notes[DISK_FULL]}")
    if proc.returncode != 0 and notes.get(PREEMPTED):
        raise TrainingPreempted(f"train: {notes[PREEMPTED]}")
    if proc.returncode != 0:
        raise TrainingFailed(
            f"train: accelerate launch exited with code {proc.returncode}; last lines:\n" + "\n".join(tail)
        )
    done = model_ref(run_dir)
    if done is None:
        raise TrainingFailed(f"train: ranks exited cleanly but {run_dir / 'final'} holds no finished model")
    logger.info("train: finished at step %d, training loss %.4f", done.global_step, done.training_loss)
    return done
