"""Task families: one module per family, each exposing the same small interface.

    task = get_task("text_classification")
    model = task.build_model(model_spec, task_spec)

A task module defines:
    MODEL_INPUT_NAMES: columns the model takes (the rest of a tokenized split is dropped)
    build_model(model_spec, task_spec) -> PreTrainedModel
    data_collator(tokenizer) -> callable(list[dict]) -> dict[str, Tensor]
    loss_per_example(logits, labels, label_smoothing=0.0) -> Tensor [B]  (summed over an example's items)
    count_items(labels) -> Tensor [B]  (items per example: 1, or its label tokens)
    postprocess(logits, task_spec) -> dict of per-example outputs (label ids, scores)
    metric_names(task_spec) -> list[str]
    compute_metrics(task_spec) -> callable(predictions, label_ids) -> dict[str, float]

Adding a task is adding one module here (and its YAML in conf/).
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = ("text_classification", "token_classification")


def get_task(family: str) -> ModuleType:
    """The module of a task family."""
    if family not in FAMILIES:
        raise ValueError(f"task.family={family!r}: use one of {', '.join(FAMILIES)} (modules of trainer_core/tasks/).")
    return importlib.import_module(f"trainer_core.tasks.{family}")
