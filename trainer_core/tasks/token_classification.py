"""Token classification (tagging): one label per token, -100 marks tokens without a label."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification, PreTrainedModel

from trainer_core.metrics import load_metric
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks import _common

MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "labels")
IGNORE_INDEX = -100


def build_model(model_spec: ModelSpec, task_spec: TaskSpec) -> PreTrainedModel:
    return _common.build_model(AutoModelForTokenClassification, model_spec, task_spec)


def data_collator(tokenizer: Any = None) -> Callable[[list[dict]], dict]:
    return _common.pad_collator(tokenizer, label_pad=IGNORE_INDEX)


def loss_per_example(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over each example's labelled tokens."""
    per_token = F.cross_entropy(
        logits.float().transpose(1, 2), labels.long(), reduction="none",
        ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
    )
    return per_token.sum(dim=1)


def count_items(labels: torch.Tensor) -> torch.Tensor:
    return labels.ne(IGNORE_INDEX).sum(dim=1)


def postprocess(logits: np.ndarray, task_spec: TaskSpec) -> dict[str, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = probs.argmax(axis=-1)
    return {"prediction": ids, "score": np.take_along_axis(probs, ids[..., None], axis=-1)[..., 0]}


def metric_names(task_spec: TaskSpec) -> list[str]:
    return list(task_spec.metrics)


def compute_metrics(task_spec: TaskSpec) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    modules = {name: load_metric(name) for name in task_spec.metrics}

    def compute(predictions: np.ndarray, label_ids: np.ndarray) -> dict[str, float]:
        preds = np.asarray(predictions)
        if preds.ndim == 3:
            preds = preds.argmax(axis=-1)
        mask = np.asarray(label_ids) != IGNORE_INDEX
        results: dict[str, float] = {}
        for name, module in modules.items():
            kwargs = {"average": "macro"} if name == "f1" else {}
            results.update(module.compute(predictions=preds[mask], references=np.asarray(label_ids)[mask], **kwargs))
        return results

    return compute
