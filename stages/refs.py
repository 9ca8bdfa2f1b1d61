"""Small, JSON-serialisable references that stages hand each other.

A Ref is a folder (or registry entry) plus a content fingerprint plus a few facts. Never a live object:
no DataLoader, model or Dataset crosses a stage boundary. Every Ref can say whether it is still valid,
so a cache hit whose files are gone or altered becomes a miss instead of a crash downstream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from trainer_core.files import sha256_dir, write_json_atomic  # noqa: F401 - write_json_atomic: for the stages
from trainer_core.files import sha256_file as file_sha256


def dir_fingerprint(path: str | Path, exclude: tuple[str, ...] = ("ref.json",)) -> str:
    """trainer_core.files.sha256_dir of a stage folder, less its ref.json (which records this fingerprint)."""
    return sha256_dir(path, exclude)


class Ref(BaseModel):
    model_config = ConfigDict(frozen=True)

    def is_valid(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, {"type": type(self).__name__, **self.model_dump(mode="json")})

    @staticmethod
    def load(path: str | Path) -> Ref | None:
        """The Ref stored at path, or None when missing or unreadable."""
        try:
            raw = json.loads(Path(path).read_text())
            return REF_TYPES[raw.pop("type")](**raw)
        except (OSError, ValueError, KeyError, TypeError):
            return None


class DatasetRef(Ref):
    path: str
    """Folder with dataset/ (datasets.save_to_disk, tokenized) and tokenizer/."""
    fingerprint: str
    num_rows: dict[str, int]
    input_columns: list[str]
    """Raw columns kept next to the features (the served model's inputs)."""
    task: dict[str, Any] = {}
    """The TaskSpec the features were prepared for: `family()` rebuilds its task family."""
    vocab_size: int
    tokenizer_fingerprint: str

    def family(self) -> Any:
        """The task family (trainer_core/tasks/) these features were prepared by."""
        from trainer_core.spec import TaskSpec
        from trainer_core.tasks import get_task

        spec = TaskSpec(**self.task)
        return get_task(spec.family)(spec)

    @property
    def dataset_dir(self) -> str:
        return str(Path(self.path) / "dataset")

    @property
    def tokenizer_dir(self) -> str:
        return str(Path(self.path) / "tokenizer")

    def is_valid(self) -> bool:
        return Path(self.path).is_dir() and dir_fingerprint(self.path) == self.fingerprint


class BatchPlanRef(Ref):
    path: str
    """The plan file (trainer_core.data.BatchPlan.save)."""
    fingerprint: str
    world_size: int
    global_micro_batch_size: int
    num_optimizer_steps: int
    num_epochs: int

    def is_valid(self) -> bool:
        return Path(self.path).is_file() and file_sha256(self.path) == self.fingerprint


class ModelRef(Ref):
    path: str
    """final/ folder of the run: model.safetensors, config.json, tokenizer, train_result.json."""
    fingerprint: str
    """SHA-256 of model.safetensors: the identity of the weights."""
    run_dir: str
    spec_path: str
    global_step: int
    training_loss: float
    train_metrics: dict[str, float] = {}

    @property
    def metrics_path(self) -> str:
        return str(Path(self.run_dir) / "metrics.jsonl")

    def is_valid(self) -> bool:
        weights = Path(self.path) / "model.safetensors"
        return weights.is_file() and file_sha256(weights) == self.fingerprint


class MetricsRef(Ref):
    path: str
    metrics: dict[str, float]
    split: str
    num_samples: int
    fingerprint: str

    def is_valid(self) -> bool:
        return Path(self.path).is_file() and file_sha256(self.path) == self.fingerprint


class PredictionsRef(Ref):
    path: str
    """JSONL: one line per test row with the prediction, its score and the input text."""
    fingerprint: str
    num_rows: int
    split: str
    metrics: dict[str, float] = {}
    """Task metrics on the split when it has labels."""

    def is_valid(self) -> bool:
        return Path(self.path).is_file() and file_sha256(self.path) == self.fingerprint


class ModelVersionRef(Ref):
    name: str
    version: str
    aliases: list[str]
    run_id: str
    model_uri: str
    tracking_uri: str
    model_fingerprint: str

    def is_valid(self) -> bool:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            version = MlflowClient(self.tracking_uri).get_model_version(self.name, self.version)
        except MlflowException:
            return False
        return version.tags.get("model_fingerprint") == self.model_fingerprint


REF_TYPES: dict[str, type[Ref]] = {
    cls.__name__: cls for cls in (DatasetRef, BatchPlanRef, ModelRef, MetricsRef, PredictionsRef, ModelVersionRef)
}
