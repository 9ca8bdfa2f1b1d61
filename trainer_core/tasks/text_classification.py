"""Sequence classification (single sentences or pairs) and regression (num_labels == 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from trainer_core.metrics import load_metric
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks import _common

MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "labels")


def build_model(model_spec: ModelSpec, task_spec: TaskSpec) -> PreTrainedModel:
    return _common.build_model(AutoModelForSequenceClassification, model_spec, task_spec)


def data_collator(tokenizer: Any = None) -> Callable[[list[dict]], dict]:
    return _common.pad_collator(tokenizer)


def loss_per_example(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy per example (MSE for regression); the trainer sums and normalises."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1).float() - labels.float()) ** 2
    return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)


def count_items(labels: torch.Tensor) -> torch.Tensor:
    return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)


def postprocess(logits: np.ndarray, task_spec: TaskSpec) -> dict[str, np.ndarray]:
    """Logits -> predicted label ids and their softmax score (the raw value for regression)."""
    logits = np.asarray(logits, dtype=np.float64)
    if task_spec.num_labels == 1:
        return {"prediction": logits.reshape(-1), "score": logits.reshape(-1)}
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    label_ids = probs.argmax(axis=-1)
    return {"prediction": label_ids, "score": probs[np.arange(len(probs)), label_ids]}


def metric_names(task_spec: TaskSpec) -> list[str]:
    return list(task_spec.metrics)


def compute_metrics(task_spec: TaskSpec) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    modules = {name: load_metric(name) for name in task_spec.metrics}
    extra = {"f1": {"average": "binary" if task_spec.num_labels == 2 else "macro"}}

    def compute(predictions: np.ndarray, label_ids: np.ndarray) -> dict[str, float]:
        preds = np.asarray(predictions)
        # logits in, unless preprocess_logits_for_metrics already reduced them to ids
        if preds.ndim > 1:
            preds = preds.reshape(-1) if task_spec.num_labels == 1 else preds.argmax(axis=-1)
        results: dict[str, float] = {}
        for name, module in modules.items():
            results.update(module.compute(predictions=preds, references=label_ids, **extra.get(name, {})))
        return results

    return compute
