"""Checkpoints on the tracking server: each committed checkpoint as an MLflow 3 LoggedModel of the flow's run.

    uploader = CheckpointUploader(run, content_key, run_dir, logger, shipper=shipper)
    uploader.start()          # a thread of the train stage (flow process): the ranks never wait for it
    ...                       # the ranks commit checkpoints/step-N (manifest last); the thread notices and uploads
    uploader.close()          # the last uploads finish before the stage returns

    found = newest_checkpoint(tracking_uri, experiment_id, content_key)   # READY ones only, newest step first
    download(found, run_dir, tracking_uri)                                 # verified, then renamed into place

A LoggedModel is initialised (PENDING), its files uploaded, its step's eval metrics linked to it (`model_id`),
and only then finalised READY: a PENDING or FAILED one is never resumed from, and a READY one is still checked
against the SHA-256s of its manifest once downloaded. Each carries the train stage's content key (what decides
the weights, with no path in it), so a run on another machine with an empty paths.root finds it; only runs that
did not finish are resumed from. Rotation is mirrored: what trainer_core's save_total_limit removed from the run
folder is deleted from the server too, never the best checkpoint nor a finished run's.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.refs import Ref
from stages.schema import stable_hash
from trainer_core import checkpoint as ckpt
from trainer_core.files import sha256_file

KIND, CHECKPOINT = "finetune.kind", "checkpoint"
CONTENT_KEY = "finetune.content_key"
STEP = "finetune.global_step"
MANIFEST_SHA = "finetune.manifest_sha256"
RESUMED_FROM_RUN, RESUMED_FROM_CHECKPOINT = "resumed_from_run", "resumed_from_checkpoint"
POLL_SECONDS = 2.0
PATH_FIELDS = frozenset({"path", "run_dir", "spec_path"})
"""Fields of a Ref that say where its files lie on this machine, not what they hold (the fingerprint does)."""


def content_key(parameters: dict[str, Any], code: str) -> str:
    """The train stage's key without anything machine-local: config subtrees, input fingerprints, code."""

    def portable(value: Any) -> Any:
        if isinstance(value, Ref):
            return {k: v for k, v in value.model_dump(mode="json").items() if k not in PATH_FIELDS}
        return value

    kept = {name: portable(value) for name, value in parameters.items() if name not in ("run", "paths")}
    return stable_hash({"parameters": kept, "code": code})[:32]


def manifest_sha(folder: Path) -> str:
    return sha256_file(folder / ckpt.MANIFEST)


def _step_of(model) -> int:
    return int(model.tags.get(STEP, "-1"))


def checkpoint_models(mlflow_client, experiment_id: str, key: str) -> list:
    """Every checkpoint LoggedModel of this content key (any status), newest step first."""
    found, token = [], None
    while True:
        page = mlflow_client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"tags.`{CONTENT_KEY}` = '{key}'", page_token=token,
        )
        found.extend(m for m in page if m.tags.get(KIND) == CHECKPOINT)
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda m: (_step_of(m), m.creation_timestamp), reverse=True)


def _ready(model) -> bool:
    # in Python: on the SQLite store a status filter matches nothing
    return str(getattr(model.status, "name", model.status)).endswith("READY")


def _finished(mlflow_client, model, seen: dict[str, bool]) -> bool:
    """Whether the run that logged this checkpoint finished: its training is complete (and maybe registered),
    so its checkpoints are not a resume point (`reproduce=` retrains from step 0) nor ours to rotate."""
    run_id = model.source_run_id
    if run_id not in seen:
        try:
            seen[run_id] = mlflow_client.get_run(run_id).info.status == "FINISHED"
        except Exception:  # noqa: BLE001 - a deleted run: nothing to protect
            seen[run_id] = False
    return seen[run_id]


def newest_checkpoint(tracking_uri: str, experiment_id: str, key: str, skip: set[str] = frozenset()):
    """The newest READY checkpoint LoggedModel of this content key from a run that did not finish (killed,
    failed, or running: an interrupted training), or None."""
    from stages.tracking import client

    mlflow_client, seen = client(tracking_uri), {}
    for model in checkpoint_models(mlflow_client, experiment_id, key):
        if _ready(model) and model.model_id not in skip and not _finished(mlflow_client, model, seen):
            return model
    return None


class CheckpointDownloadFailed(RuntimeError):
    pass


def download(model, run_dir: Path, tracking_uri: str) -> Path:
    """Fetch a checkpoint LoggedModel into run_dir/checkpoints/step-N: into a temp sibling first, its manifest
    verified (every file's SHA-256, and the manifest's own against the tag), then renamed into place."""
    import mlflow.artifacts

    step = _step_of(model)
    final = ckpt.checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".download-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp),
                                                       tracking_uri=tracking_uri))
        problem = ckpt.verify(got)
        if problem is None and manifest_sha(got) != model.tags.get(MANIFEST_SHA):
            problem = "its manifest is not the one the upload recorded"
        if problem is not None:
            raise CheckpointDownloadFailed(f"checkpoint {model.model_id} (step {step}): {problem}")
        if final.exists():
            shutil.rmtree(final)
        got.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch_newest(run, key: str, run_dir: Path, logger) -> tuple[Any, Path] | None:
    """Download the newest complete checkpoint of `key` (and the best one it names, which rotation keeps)
    into an empty run folder; a READY one whose files do not verify is skipped for the next older one."""
    skip: set[str] = set()
    while (model := newest_checkpoint(run.tracking_uri, run.experiment_id, key, skip)) is not None:
        try:
            path = download(model, run_dir, run.tracking_uri)
        except Exception as exc:  # noqa: BLE001 - a broken upload: try the previous one
            logger.warning("train: skipping checkpoint %s on the tracking server: %s", model.model_id, exc)
            skip.add(model.model_id)
            continue
        fetch_best(run, key, run_dir, path, logger)
        return model, path
    return None


def _best_step(folder: Path) -> int | None:
    try:
        best = json.loads((folder / "trainer_state.json").read_text()).get("best_model_checkpoint")
    except (OSError, ValueError):
        return None
    return int(Path(best).name.removeprefix("step-")) if best else None


def fetch_best(run, key: str, run_dir: Path, newest: Path, logger) -> None:
    """Download the best checkpoint that `newest` names (load_best_model_at_end reads it at the end of training)
    unless the run folder has it; a failure is a warning: the resume does not need it, and the next attempt asks
    again."""
    best = _best_step(newest)
    if best is None or ckpt.checkpoint_dir(run_dir, best).exists():
        return
    from stages.tracking import client

    try:
        for model in checkpoint_models(client(run.tracking_uri), run.experiment_id, key):
            if _ready(model) and _step_of(model) == best:
                download(model, run_dir, run.tracking_uri)
                return
    except Exception as exc:  # noqa: BLE001 - the resume does not need it, only load_best_model_at_end
        logger.warning("train: could not fetch the best checkpoint (step %d): %s", best, exc)


@dataclass
class Uploaded:
    step: int
    model_id: str
    manifest_sha: str


class CheckpointUploader:
    """Uploads each newly committed checkpoint of a run folder as a LoggedModel, from a background thread."""

    def __init__(self, run, key: str, run_dir: Path, logger, shipper=None, save_total_limit: int | None = None,
                 poll_seconds: float = POLL_SECONDS):
        from stages.tracking import client

        self.run, self.key, self.run_dir, self.logger = run, key, Path(run_dir), logger
        self.save_total_limit = save_total_limit
        self.shipper = shipper
        self.client = client(run.tracking_uri)
        self.poll_seconds = poll_seconds
        self.uploaded: dict[int, Uploaded] = {}
        """step -> its READY LoggedModel on the server (rotated ones leave)."""
        self.uploads = 0
        """How many checkpoints this uploader sent."""
        self._known = False
        """Whether `uploaded` holds what the server had when we started (asked again while it does not answer)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.errors: list[str] = []

    # --- the thread ------------------------------------------------------------------------------
    def start(self) -> CheckpointUploader:
        self._thread = threading.Thread(target=self._loop, name="checkpoint-uploader", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop polling, then upload what is still missing: the last checkpoints are on the server after this."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync()

    def _loop(self) -> None:
        while True:
            self.sync()  # the first pass learns what the server holds, and uploads what a stopped attempt left
            if self._stop.wait(self.poll_seconds):
                return

    def _known_on_server(self) -> None:
        """READY checkpoints of this content key already there (a retry, a resume): not uploaded again."""
        for model in checkpoint_models(self.client, self.run.experiment_id, self.key):
            if _ready(model):
                self.uploaded.setdefault(_step_of(model), Uploaded(_step_of(model), model.model_id,
                                                                   model.tags.get(MANIFEST_SHA, "")))

    # --- one pass -------------------------------------------------------------------------------
    def sync(self) -> None:
        """Upload every committed checkpoint not yet uploaded (oldest first), then mirror the rotation."""
        with self._lock:
            try:
                if not self._known:
                    self._known_on_server()
                    self._known = True
                for folder in ckpt.list_checkpoints(self.run_dir):
                    if self._needs_upload(folder):
                        self._upload(folder)
                self._mirror_rotation()
            except Exception as exc:  # noqa: BLE001 - the server is away or the folder rotated meanwhile: next pass
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if message not in self.errors:
                    self.logger.warning("train: checkpoint upload to MLflow failed (%s); retrying", message)
                self.errors.append(message)

    def _needs_upload(self, folder: Path) -> bool:
        step = int(folder.name.removeprefix("step-"))
        if not (folder / ckpt.MANIFEST).is_file():
            return False
        done = self.uploaded.get(step)
        return done is None or done.manifest_sha != manifest_sha(folder)

    def _upload(self, folder: Path) -> Uploaded | None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        step = int(folder.name.removeprefix("step-"))
        if ckpt.verify(folder) is not None:  # rotated away while we looked, or not ours to trust
            return None
        sha = manifest_sha(folder)
        tags = {KIND: CHECKPOINT, CONTENT_KEY: self.key, STEP: str(step), MANIFEST_SHA: sha,
                "mlflow_run_id": self.run.run_id}
        model = self.client.create_logged_model(self.run.experiment_id, name=f"checkpoint-{step:08d}",
                                                source_run_id=self.run.run_id, tags=tags)
        self.client.log_model_artifacts(model.model_id, str(folder))
        self._link_metrics(model.model_id, step)
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)  # after the last file
        self.client.log_outputs(self.run.run_id, [LoggedModelOutput(model.model_id, step)])
        done = self.uploaded[step] = Uploaded(step, model.model_id, sha)
        self.uploads += 1
        self.logger.info("train: checkpoint step %d logged to MLflow as %s", step, model.model_id)
        return done

    def _link_metrics(self, model_id: str, step: int) -> None:
        """The step's eval metrics, attached to the checkpoint: logged again with model_id and the timestamp they
        reached the run with, so the run keeps one point per step (MLflow drops an identical point) and the
        LoggedModel lists them."""
        from mlflow.entities import Metric

        if self.shipper is None:
            return
        self.shipper.ship(self.run_dir / "metrics.jsonl")  # the step's metrics are in the file before its manifest
        linked = []
        for key in self.client.get_run(self.run.run_id).data.metrics:
            if not key.startswith("eval_"):
                continue
            for point in self.client.get_metric_history(self.run.run_id, key):
                if point.step == step:
                    linked.append(Metric(key, point.value, point.timestamp, step, model_id=model_id,
                                         run_id=self.run.run_id))
        if linked:
            self.client.log_batch(self.run.run_id, metrics=linked)

    def _mirror_rotation(self) -> None:
        """Delete the LoggedModels of checkpoints trainer_core rotated out of the run folder, never the best."""
        local = {int(p.name.removeprefix("step-")) for p in ckpt.list_checkpoints(self.run_dir)}
        if not local or not self.save_total_limit:  # no limit: trainer_core deletes nothing, neither do we
            return
        best = _best_step(ckpt.checkpoint_dir(self.run_dir, max(local)))
        seen: dict[str, bool] = {}
        for model in checkpoint_models(self.client, self.run.experiment_id, self.key):
            step = _step_of(model)
            if step in local or step == best or not _ready(model) or _finished(self.client, model, seen):
                continue
            self.client.delete_logged_model(model.model_id)
            self.uploaded.pop(step, None)
            self.logger.info("train: checkpoint step %d rotated out (save_total_limit): deleted %s from MLflow",
                             step, model.model_id)


def best_checkpoint_model(tracking_uri: str, experiment_id: str, key: str, step: int):
    """The READY checkpoint LoggedModel of `key` at `step` (the registered version links to it), or None."""
    from stages.tracking import client

    for model in checkpoint_models(client(tracking_uri), experiment_id, key):
        if _ready(model) and _step_of(model) == step:
            return model
    return None

