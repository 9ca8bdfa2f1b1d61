"""trainer_core: the training engine (no prefect, hydra or mlflow in here).

    from trainer_core import Trainer, TrainingArguments, build_batch_plan, BatchPlan, get_task

Heavy modules (torch, accelerate, transformers) load on first use, so `trainer_core.spec` stays cheap to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrainingArguments": "trainer_core.args",
    "RunSpec": "trainer_core.spec",
    "TaskSpec": "trainer_core.spec",
    "ModelSpec": "trainer_core.spec",
    "BatchPlan": "trainer_core.data",
    "build_batch_plan": "trainer_core.data",
    "Trainer": "trainer_core.trainer",
    "TrainOutput": "trainer_core.trainer",
    "PredictionOutput": "trainer_core.trainer",
    "get_task": "trainer_core.tasks",
    "find_resumable": "trainer_core.checkpoint",
    "build_trainer": "trainer_core.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer_core' has no attribute {name!r}")
