"""The run spec: everything a rank needs to train, written by stages/train.py as JSON.

    accelerate launch --config_file <run_dir>/accelerate.yaml -m trainer_core.run --spec <run_dir>/spec.json

Plain JSON in, so that trainer_core stays free of prefect, hydra and mlflow.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_core.args import TrainingArguments

DIVERGED = "training diverged:"
"""Start of the ranks' one-line error when trainer.stop_on_nonfinite stops a run; the train stage looks for it."""
PREEMPTED = "training stopped on SIGTERM:"
"""The start of the line rank 0 logs when the ranks stopped on SIGTERM (trainer.save_on_sigterm)."""
DISK_FULL = "checkpoint not written:"
"""The start of the error line of a checkpoint that did not fit (trainer_core.checkpointing)."""


@dataclass
class TaskSpec:
    """What a task family (trainer_core/tasks/) is told about the task: the schema's `task` group, JSON-able."""

    family: str = "text_classification"
    """Module under trainer_core/tasks/ that knows how to prepare, build the model, collate, score and serve."""
    columns: dict[str, str | None] = field(default_factory=lambda: {"text": "text", "label": "label"})
    """Raw-column role -> column name (text, text_pair, label, question, context, image, ...)."""
    num_labels: int = 2
    """1 means regression."""
    label_names: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    max_seq_length: int = 128
    options: dict[str, Any] = field(default_factory=dict)
    """The family's own options (task.options), checked against its Options dataclass."""
    train_split: str = "train"
    eval_split: str = "validation"


@dataclass
class ModelSpec:
    name_or_path: str | None = None
    """A local folder or Hub id of pretrained weights; None builds from `config` with random weights."""
    config: dict[str, Any] = field(default_factory=dict)
    """Model config for random init (`model_type` plus sizes), or overrides of the pretrained config."""
    revision: str | None = None
    trust_remote_code: bool = False
    dropout: float | None = None
    """Override every dropout probability of the model (0 for exactly reproducible comparisons)."""


@dataclass
class RunSpec:
    args: TrainingArguments
    task: TaskSpec
    model: ModelSpec
    dataset_dir: str
    """`datasets.load_from_disk` folder with tokenized splits (input_ids, attention_mask, ..., labels)."""
    tokenizer_dir: str
    plan_path: str
    """Batch plan written by stages/build_dataloaders (see trainer_core.data)."""
    output_dir: str
    """Run folder: checkpoints/, final/, metrics.jsonl, train_result.json."""
    config_hash: str = ""
    """Hash of the config that decides the weights; a checkpoint from another config is refused."""
    config_components: dict[str, Any] = field(default_factory=dict)
    """What config_hash covers, readable (model, task, num_labels, data fingerprint): a refused resume names
    the components that differ."""
    mlflow_run_id: str | None = None
    """Recorded in checkpoints only; trainer_core never talks to MLflow."""
    distributed: dict[str, Any] = field(default_factory=dict)
    """The requested topology: {"distributed_type": "FSDP", "fsdp_config": {...}} (hardware group). On CPU
    Accelerate would run FSDP as DDP; trainer_core.distributed shards with FSDP2 instead."""
    peft: dict[str, Any] = field(default_factory=dict)
    """The `peft` group (PEFT's LoraConfig names, stages.schema.PeftConfig.spec); {} = full fine-tune."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        raw = dict(raw)
        return cls(
            args=TrainingArguments(**raw.pop("args")),
            task=TaskSpec(**raw.pop("task")),
            model=ModelSpec(**raw.pop("model")),
            **raw,
        )

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))
