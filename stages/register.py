"""Stage 6: log the model to the flow's MLflow run, register it, move the aliases → ModelVersionRef.

Every new version gets alias `candidate`. `champion` moves only through the promotion gate: the configured
metric reaches its threshold and is no worse than the current champion's on the same eval data. The gate's
decision and numbers are recorded as tags on the version, next to the lineage tags. Registering the same
weights again reuses their version (looked up by the weights' SHA-256).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path

from prefect import task

from stages.caching import REPO, begin_stage, cache_key_fn, code_version, single_writer, stage_logger
from stages.refs import DatasetRef, MetricsRef, ModelRef, ModelVersionRef
from stages.schema import PathsConfig, RegistryConfig, TaskConfig
from stages.tracking import CANDIDATE, CHAMPION, RunInfo, champion_history, client
from trainer_core.metrics import is_better

NAME = "register"
CODE = ("stages.register", "flows.serving_model", "trainer_core.tasks")
SERVING_CODE = REPO / "flows" / "serving_model.py"
"""The registered model's code (a file MLflow stores as source); trainer_core goes with it as code."""
TASK_CODE = REPO / "trainer_core"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    value: float | None
    champion_version: str | None = None
    champion_value: float | None = None

    def tags(self, registry: RegistryConfig) -> dict[str, str]:
        return {
            "gate.decision": "promoted" if self.promote else "not_promoted",
            "gate.reason": self.reason,
            "gate.metric": registry.champion_metric,
            "gate.value": str(self.value),
            "gate.threshold": str(registry.champion_threshold),
            "gate.champion_version": str(self.champion_version),
            "gate.champion_value": str(self.champion_value),
        }


def gate(mlflow_client, registry: RegistryConfig, metrics: dict[str, float], data_fingerprint: str) -> GateDecision:
    """Decide whether a version with these validation metrics may take `champion`."""
    from mlflow.exceptions import MlflowException

    metric = registry.champion_metric
    value = metrics.get(metric)

    def reaches(a: float, b: float) -> bool:  # ties reach: a version as good as the champion may replace it
        return a == b or is_better(a, b, registry.higher_is_better())

    if value is None:
        return GateDecision(False, f"no validation metric {metric!r}", None)
    if not math.isfinite(value):  # a diverged model scores nan; inf would beat any threshold
        return GateDecision(False, f"{metric}={value} is not finite: a champion needs a finite {metric}", value)
    if not reaches(value, registry.champion_threshold):
        return GateDecision(False, f"{metric}={value:.4f} misses the threshold {registry.champion_threshold}", value)
    try:
        champion = mlflow_client.get_model_version_by_alias(registry.model_name, CHAMPION)
    except MlflowException:
        return GateDecision(True, f"{metric}={value:.4f} reaches {registry.champion_threshold}; no champion yet", value)
    champion_value = float(champion.tags.get(f"metric.{metric}", "nan"))
    if champion.tags.get("data_fingerprint") != data_fingerprint:
        return GateDecision(
            False, "the champion was evaluated on other data; compare by hand and promote with flows.registry",
            value, champion.version, champion_value,
        )
    if champion_value == champion_value and not reaches(value, champion_value):  # nan: champion without the metric
        return GateDecision(
            False, f"{metric}={value:.4f} is worse than champion v{champion.version} ({champion_value:.4f})",
            value, champion.version, champion_value,
        )
    return GateDecision(
        True, f"{metric}={value:.4f} reaches {registry.champion_threshold} and is no worse than v{champion.version}",
        value, champion.version, champion_value,
    )


def _settle_champion(mlflow_client, registry: RegistryConfig, decision: GateDecision, data_fingerprint: str) -> None:
    """Flows that pass the gate at the same time all move champion; the last writer must not win with a worse model.

    Versions promoted against the same predecessor raced each other: after our own write, champion goes to the
    best of them. Their gate tags are written before their alias, so whichever finishes last sees them all. Not a
    racer: a version moved off champion by hand since (a rollback or manual promotion, in champion_history: the
    team's decision stands), nor one evaluated on other data (its metric does not compare; with no predecessor,
    every version that once took champion from none has the same gate.champion_version).
    """
    name = registry.model_name
    demoted = {str(event.get("from")) for event in champion_history(mlflow_client.get_registered_model(name))}
    racers = [
        v for v in mlflow_client.search_model_versions(f"name = '{name}'")
        if v.tags.get("gate.decision") == "promoted"
        and v.tags.get("gate.champion_version") == str(decision.champion_version)
        and v.tags.get("data_fingerprint") == data_fingerprint
        and str(v.version) not in demoted
    ]
    if len(racers) < 2:
        return
    sign = 1.0 if registry.higher_is_better() else -1.0
    # ties go to the first registered: what a sequential run would have kept
    best = max(racers, key=lambda v: (sign * float(v.tags.get("gate.value", "nan")), -int(v.version)))
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(best.version))


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _signature(schema: dict[str, list]):
    """The task family's plain-data signature as an MLflow ModelSignature (inputs, outputs, inference params)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    def columns(specs: list) -> Schema:
        return Schema([ColSpec(kind, name) if name else ColSpec(kind) for kind, name in specs])

    params = ParamSchema([ParamSpec(name, kind, default) for name, kind, default in schema.get("params", [])])
    return ModelSignature(inputs=columns(schema["inputs"]), outputs=columns(schema["outputs"]),
                          params=params if schema.get("params") else None)


def _package_model(model: ModelRef, data: DatasetRef, task: TaskConfig, out: Path, merge_adapter: bool = True) -> Path:
    """An MLflow pyfunc folder: our serving code and the task families as source, the safetensors weights and
    tokenizer as artifacts (a LoRA run with registry.merge_adapter=false: the adapter and its pinned base)."""
    import datasets
    import mlflow

    from trainer_core import adapters  # torch: not imported by a cached run
    from trainer_core.tasks import get_task

    family = get_task(task.family)(task.spec())
    weights = out / "weights"
    shutil.copytree(model.path, weights)
    adapter_only = not merge_adapter and adapters.lineage_tags(model.path)["peft.method"] != "none"
    if adapter_only:
        base = json.loads(Path(model.spec_path).read_text())["model"]
        adapters.strip_to_adapter(weights, adapters.pin_base(base["name_or_path"], base.get("revision")))
    (weights / "serving.json").write_text(json.dumps(family.serving_meta()))
    validation = datasets.load_from_disk(data.dataset_dir)["validation"]
    packages = ("torch", "transformers", "mlflow", "pandas", "safetensors", *(("peft",) if adapter_only else ()))
    requirements = [f"{p}=={installed_version(p)}" for p in packages]
    package = out / "model"
    mlflow.pyfunc.save_model(
        path=str(package),
        python_model=str(SERVING_CODE),
        artifacts={"model_dir": str(weights)},
        code_paths=[str(TASK_CODE)],
        signature=_signature(family.serving_schema()),
        input_example=family.input_example(validation),
        pip_requirements=[r.replace("+cpu", "") for r in requirements],
    )
    return package


def _base_tags(weights: Path) -> dict[str, str]:
    from trainer_core import adapters  # torch: not imported by a cached run

    if not adapters.is_adapter_package(weights):
        return {}
    base = json.loads((weights / adapters.BASE_REFERENCE).read_text())
    return {"peft.base": base["name_or_path"], "peft.base_revision": str(base.get("revision")),
            "peft.base_sha256": base["sha256"]}


def _existing_version(mlflow_client, name: str, fingerprint: str, registered_as: str | None = None):
    """The first version of these weights; for a LoRA run, registered the same way (merged or the adapter alone:
    the same training registered both ways gives two versions)."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client.search_model_versions(f"name = '{name}' and tags.model_fingerprint = '{fingerprint}'")
    except MlflowException:
        return None
    found = [v for v in found if v.tags.get("peft.registered_as") == registered_as]
    return min(found, key=lambda v: int(v.version)) if found else None


def _best_checkpoint_model_id(mlflow_client, model: ModelRef, run: RunInfo) -> str | None:
    """With load_best_model_at_end: the LoggedModel of the best checkpoint (found by its manifest's SHA-256,
    which the train stage's uploader tags it with), so the version shows the metrics it was chosen on."""
    from stages.checkpoint_store import MANIFEST_SHA, manifest_sha

    try:
        if not json.loads(Path(model.spec_path).read_text())["args"].get("load_best_model_at_end"):
            return None  # the registered weights are the last step's, not a checkpoint's
        best = json.loads((Path(model.path) / "train_result.json").read_text()).get("best_model_checkpoint")
        folder = Path(model.run_dir) / "checkpoints" / Path(best).name if best else None
        sha = manifest_sha(folder) if folder else None
    except (OSError, ValueError, KeyError):
        return None
    if sha is None:
        return None
    found = mlflow_client.search_logged_models([run.experiment_id], filter_string=f"tags.`{MANIFEST_SHA}` = '{sha}'")
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).endswith("READY")]
    return ready[0].model_id if ready else None


def _link_checkpoint(mlflow_client, model_id: str, name: str, version: str) -> None:
    """The LoggedModel's `mlflow.modelVersions` tag is the link the UI follows (and the version's
    `best_checkpoint_model_id` tag the other way). Set here rather than through create_model_version(model_id=):
    an `mlflow server` accepts a model_id only for a source inside that LoggedModel, and the registered package
    is not the checkpoint's files."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(mlflow_client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if any(entry.get("name") == name and str(entry.get("version")) == version for entry in linked):
        return
    linked.append({"name": name, "version": version})
    mlflow_client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})


def _create_version(mlflow_client, name: str, source: str, run_id: str, tags: dict[str, str]):
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    for _ in range(300):
        if version.status == "READY":
            break
        time.sleep(1)
        version = mlflow_client.get_model_version(name, version.version)
    return version


def _gate_and_alias(mlflow_client, registry: RegistryConfig, name: str, version, metrics: MetricsRef,
                    data: DatasetRef, log) -> None:
    """Alias candidate, the gate's decision as tags, then champion if it passed (the tags first: a version with
    gate.decision has had all of this)."""
    mlflow_client.set_registered_model_alias(name, CANDIDATE, version.version)
    decision = gate(mlflow_client, registry, metrics.metrics, data.fingerprint)
    for key, value in decision.tags(registry).items():
        mlflow_client.set_model_version_tag(name, version.version, key, value)
    if decision.promote:
        mlflow_client.set_registered_model_alias(name, CHAMPION, version.version)
        _settle_champion(mlflow_client, registry, decision, data.fingerprint)
    log.info("register: champion gate %s (%s)", "passed" if decision.promote else "not passed", decision.reason)


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
@single_writer(NAME, CODE)
def register(
    model: ModelRef,
    metrics: MetricsRef,
    data: DatasetRef,
    task: TaskConfig,
    registry: RegistryConfig,
    tracking_uri: str,
    paths: PathsConfig,
    run: RunInfo,
) -> ModelVersionRef:
    """Register `model` as registry.model_name; alias candidate; champion if the gate passes."""
    from trainer_core import adapters  # torch: not imported by a cached run

    out = begin_stage(NAME, {"model": model, "metrics": metrics, "data": data, "task": task, "registry": registry,
                             "tracking_uri": tracking_uri, "paths": paths, "run": run}, CODE)
    log = stage_logger()
    mlflow_client = client(tracking_uri)
    name = registry.model_name
    registered_as = adapters.lineage_tags(model.path, merged=registry.merge_adapter).get("peft.registered_as")
    version = _existing_version(mlflow_client, name, model.fingerprint, registered_as)
    if version is not None and "gate.decision" in version.tags:
        # Idempotent: the version, its aliases and its gate record stay as they are (re-gating a champion
        # against itself would overwrite the record of the champion it replaced).
        log.info("register: these weights are already %s v%s; reusing it", name, version.version)
    elif version is not None:
        # a registration stopped between creating the version and its gate (killed, the server away): the
        # version is reused, and gets the aliases and the gate decision it missed
        log.warning("register: %s v%s of these weights has no gate decision (its registration stopped half way): "
                    "setting its aliases now", name, version.version)
        _gate_and_alias(mlflow_client, registry, name, version, metrics, data, log)
    else:
        package = _package_model(model, data, task, out, registry.merge_adapter)
        mlflow_client.log_artifacts(run.run_id, str(package), "model")
        source = f"{mlflow_client.get_run(run.run_id).info.artifact_uri}/model"
        spec = json.loads(Path(model.spec_path).read_text())
        lineage = {
            "model_fingerprint": model.fingerprint,
            "checkpoint_config_hash": spec.get("config_hash", ""),  # what a resume must match (model, task, data)
            "data_fingerprint": data.fingerprint,
            "tokenizer_hash": data.tokenizer_fingerprint,
            "code_version": f"git:{_git_commit()} src:{code_version('stages', 'trainer_core', 'flows')[:16]}",
            "prefect_flow_run_id": run.flow_run_id,
            "mlflow_run_id": run.run_id,
            "global_step": str(model.global_step),
            # peft.method none, or lora with its rank and targets, merged or an adapter on a pinned base
            **adapters.lineage_tags(model.path, merged=registry.merge_adapter),
            **_base_tags(out / "weights"),
            **{f"metric.{k}": str(v) for k, v in metrics.metrics.items()},
        }
        best_model_id = _best_checkpoint_model_id(mlflow_client, model, run)
        if best_model_id:
            lineage["best_checkpoint_model_id"] = best_model_id
        # not model_id=: an mlflow server refuses a version whose source (this package) lies outside that LoggedModel
        version = _create_version(mlflow_client, name, source, run.run_id, lineage)
        if best_model_id:
            _link_checkpoint(mlflow_client, best_model_id, name, str(version.version))
        log.info("register: created %s v%s", name, version.version)
        _gate_and_alias(mlflow_client, registry, name, version, metrics, data, log)
    aliases = sorted(mlflow_client.get_model_version(name, version.version).aliases)
    ref = ModelVersionRef(
        name=name, version=str(version.version), aliases=aliases, run_id=run.run_id,
        model_uri=f"models:/{name}/{version.version}", tracking_uri=tracking_uri, model_fingerprint=model.fingerprint,
    )
    ref.save(out / "ref.json")
    return ref
