"""MLflow lifecycle: one run per flow run, reattached on retries, params once, metric steps never twice.

The flow opens (or reattaches to) the run and hands a small `RunInfo` to the stages. trainer_core never talks
to MLflow: it appends metrics to `<run_dir>/metrics.jsonl` and the train stage ships them from there, so a
killed rank loses nothing that its last checkpoint covers, and a retry does not log a step twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from stages.schema import FinetuneConfig, flatten

FLOW_RUN_TAG = "prefect.flow_run_id"
CANDIDATE, CHAMPION = "candidate", "champion"
"""The registry's aliases: every new version is `candidate`; `champion` moves only through the promotion gate
(stages/register.py) or by hand (flows/registry.py)."""
CHAMPION_HISTORY = "champion_history"
"""Registered model tag: the manual champion moves (flows.registry promote / rollback), JSON."""


def champion_history(registered_model) -> list[dict]:
    """The manual champion moves recorded on an MLflow RegisteredModel (CHAMPION_HISTORY); [] when none or
    unreadable."""
    raw = registered_model.tags.get(CHAMPION_HISTORY)
    try:
        history = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return []
    return [event for event in history if isinstance(event, dict)] if isinstance(history, list) else []
log = logging.getLogger(__name__)


class RunInfo(BaseModel):
    """Where stages report: not part of any cache key."""

    model_config = ConfigDict(frozen=True)
    run_id: str
    tracking_uri: str
    experiment_id: str
    flow_run_id: str = ""
    outage_seconds: float = 300.0
    """tracking.outage_seconds: how long the train stage waits for a server gone during training."""
    log_checkpoints: bool = True
    """tracking.log_checkpoints: the train stage logs each committed checkpoint as a LoggedModel of the run."""


def tracking_uri(cfg: FinetuneConfig) -> str:
    return cfg.tracking.uri or f"sqlite:///{Path(cfg.paths.root) / 'mlflow.db'}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_store(uri: str) -> None:
    """Create the SQLite store once, before any concurrent writer (concurrent creation races on migrations). A new
    one is a copy of the template of MLflow's migrated schema (stages.db_template); the first one saves it."""
    if not uri.startswith("sqlite:///"):
        client(uri).search_experiments(max_results=1)
        return
    from stages import db_template
    from stages.caching import key_lock

    database = Path(uri.removeprefix("sqlite:///"))
    with key_lock(database, log, "mlflow"):  # flows started together: one creates it
        template = None if database.exists() else db_template.path("mlflow", installed_version("mlflow"))
        seeded = template is not None and db_template.seed(database, template)
        client(uri).search_experiments(max_results=1)  # migrates a new store, or opens it (a copy: MLflow adds Default)
        if template is not None and not seeded:
            db_template.save(database, template, _empty_store)


def _empty_store(copy) -> bool:
    """The template is the schema alone: not even the Default experiment, whose artifact location MLflow derives
    for each store it opens. Refused if it holds any work (it never should: the creator holds the store's lock)."""
    work = copy.execute("SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM registered_models) + "
                        "(SELECT count(*) FROM experiments WHERE experiment_id != 0)").fetchone()[0]
    copy.execute("DELETE FROM experiment_tags")
    copy.execute("DELETE FROM experiments")
    return work == 0


def _experiment_id(mlflow_client, cfg: FinetuneConfig) -> str:
    experiment = mlflow_client.get_experiment_by_name(cfg.tracking.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if tracking_uri(cfg).startswith("sqlite:///"):
        artifacts = (Path(cfg.paths.root) / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(cfg.tracking.experiment_name, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 - created meanwhile by a concurrent flow
        return mlflow_client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id


def open_run(cfg: FinetuneConfig, flow_run_id: str, extra_tags: dict[str, str] | None = None) -> RunInfo:
    """The MLflow run of this flow run: reattached if a previous attempt created it, else created."""
    uri = tracking_uri(cfg)
    ensure_store(uri)
    mlflow_client = client(uri)
    experiment_id = _experiment_id(mlflow_client, cfg)
    existing = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1
    ) if flow_run_id else []
    if existing:
        run = existing[0]
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
        log.info("MLflow: reattached to run %s of flow run %s", run.info.run_id, flow_run_id)
    else:
        tags = {FLOW_RUN_TAG: flow_run_id, "task": cfg.task.name, "model": cfg.model.name, **(extra_tags or {})}
        run = mlflow_client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=tags)
    info = RunInfo(run_id=run.info.run_id, tracking_uri=uri, experiment_id=experiment_id, flow_run_id=flow_run_id,
                   outage_seconds=cfg.tracking.outage_seconds, log_checkpoints=cfg.tracking.log_checkpoints)
    log_params_once(info, flatten(cfg))
    return info


def log_params_once(run: RunInfo, params: dict[str, Any]) -> None:
    """Log params not yet on the run; a changed value keeps the first one (MLflow refuses to overwrite)."""
    from mlflow.entities import Param

    mlflow_client = client(run.tracking_uri)
    logged = mlflow_client.get_run(run.run_id).data.params
    new = []
    for key, value in params.items():
        text = "None" if value is None else str(value)
        if key not in logged:
            new.append(Param(key, text[:6000]))
        elif logged[key] != text[:6000]:
            log.warning("MLflow: param %s is %r on the run, now %r; keeping the first value", key, logged[key], text)
    for start in range(0, len(new), 100):
        mlflow_client.log_batch(run.run_id, params=new[start : start + 100])


def end_run(run: RunInfo, status: str) -> None:
    client(run.tracking_uri).set_terminated(run.run_id, status=status)


def log_metrics(run: RunInfo, metrics: dict[str, float], step: int) -> None:
    MetricShipper(run).log_records([{"step": step, "metrics": metrics}])


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering during training and did not come back in time."""


class MetricShipper:
    """Sends trainer_core's metrics.jsonl to MLflow, each (key, step) at most once across retries and outages."""

    def __init__(self, run: RunInfo):
        self.run = run
        self.client = client(run.tracking_uri)
        self._last_step: dict[str, int] = {}
        self.unreachable_since: float | None = None
        self._lock = threading.Lock()
        """The checkpoint uploader's thread ships too (before linking a step's metrics): one sender at a time."""

    def _last(self, key: str) -> int:
        if key not in self._last_step:
            history = self.client.get_metric_history(self.run.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def log_records(self, records: Iterable[dict[str, Any]]) -> int:
        with self._lock:
            return self._log_records(records)

    def _log_records(self, records: Iterable[dict[str, Any]]) -> int:
        from mlflow.entities import Metric

        batch: list[Metric] = []
        now = int(time.time() * 1000)
        pending: dict[str, int] = {}
        for record in records:
            step = int(record["step"])
            for key, value in record["metrics"].items():
                if not isinstance(value, (int, float)) or step <= pending.get(key, self._last(key)):
                    continue
                batch.append(Metric(key, float(value), now, step))
                pending[key] = step
        try:
            for start in range(0, len(batch), 1000):
                self.client.log_batch(self.run.run_id, metrics=batch[start : start + 1000])
        except Exception:
            # what reached the server is unknown (a batch may have landed, its answer lost): ask it next time
            self._last_step.clear()
            raise
        self._last_step.update(pending)
        return len(batch)

    def ship(self, metrics_path: str | Path) -> int:
        """Log what metrics.jsonl holds beyond what MLflow has; returns the number of points sent."""
        try:
            lines = Path(metrics_path).read_text().splitlines()
        except FileNotFoundError:
            return 0
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line being written right now: the next call gets it
        return self.log_records(records)

    def try_ship(self, metrics_path: str | Path, logger: logging.Logger | logging.LoggerAdapter) -> bool:
        """ship(), but a tracking server that does not answer is not an error here: the metrics wait in
        metrics.jsonl, one line says so, one line says when it answers again. True when all was sent."""
        from stages.health import probe

        uri = self.run.tracking_uri
        problem = probe(uri) if uri.startswith(("http://", "https://")) else None  # seconds, not MLflow's retries
        if problem is None:
            try:
                sent = self.ship(metrics_path)
            except Exception as exc:  # noqa: BLE001 - any failure to reach the store: keep the metrics, retry
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            else:
                if self.unreachable_since is not None:
                    logger.info("MLflow at %s answers again after %.0f s; sent the %d metric points it missed",
                                uri, time.monotonic() - self.unreachable_since, sent)
                    self.unreachable_since = None
                return True
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            logger.warning("MLflow at %s does not answer (%s); training goes on, its metrics wait in %s",
                           uri, problem, metrics_path)
        return False

    def ship_within(self, metrics_path: str | Path, seconds: float, logger, every: float = 5.0) -> None:
        """Ship all of metrics.jsonl, waiting up to `seconds` for a server that does not answer."""
        deadline = time.monotonic() + seconds
        while not self.try_ship(metrics_path, logger):
            if time.monotonic() >= deadline:
                raise TrackingUnavailable(
                    f"MLflow at {self.run.tracking_uri} (tracking.uri) did not answer for {seconds:.0f} s after "
                    f"training (tracking.outage_seconds); the model is saved and its metrics are kept in "
                    f"{metrics_path}: run the same command again once the server is back to ship them and finish."
                )
            time.sleep(every)
