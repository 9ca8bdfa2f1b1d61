"""Pieces shared by task modules: building a model from a ModelSpec, padding without a tokenizer, scoring."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load on first use: the config is validated without them
    import torch
    from transformers import PreTrainedModel

    from trainer_core.spec import ModelSpec, TaskSpec


def label_maps(task_spec: TaskSpec) -> dict[str, Any]:
    names = task_spec.label_names or [f"LABEL_{i}" for i in range(task_spec.num_labels)]
    return {
        "num_labels": task_spec.num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def _dropout_overrides(config: Any, dropout: float | None) -> dict[str, float]:
    if dropout is None:
        return {}
    return {key: dropout for key in config.to_dict() if "dropout" in key and isinstance(getattr(config, key), float)}


def build_model(auto_class: Any, model_spec: ModelSpec, task_spec: TaskSpec) -> PreTrainedModel:
    """Pretrained weights from name_or_path, or random init from `config` when name_or_path is None."""
    from transformers import AutoConfig

    labels = label_maps(task_spec)
    if model_spec.name_or_path is None:
        cfg = dict(model_spec.config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.config needs a model_type (e.g. bert) when model.name_or_path is null.")
        config = AutoConfig.for_model(model_type, **cfg, **labels)
        # every *dropout* prob, so that dropout=0 really gives a deterministic model
        for key, value in _dropout_overrides(config, model_spec.dropout).items():
            setattr(config, key, value)
        return auto_class.from_config(config, trust_remote_code=model_spec.trust_remote_code)
    config = AutoConfig.from_pretrained(
        model_spec.name_or_path, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code,
        **model_spec.config,
    )
    overrides = _dropout_overrides(config, model_spec.dropout)
    return auto_class.from_pretrained(
        model_spec.name_or_path, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code,
        **labels, **model_spec.config, **overrides,
    )


def pad_collator(tokenizer: Any = None, label_pad: int | None = None) -> Callable[[list[dict]], dict]:
    """DataCollatorWithPadding with a tokenizer; without one, right-pad with 0 (tests, pre-tokenized data).

    label_pad: pad value of sequence labels (token tasks: -100); None when labels are one per example.
    """
    import torch
    from transformers import DataCollatorWithPadding

    if tokenizer is not None and label_pad is None:
        return DataCollatorWithPadding(tokenizer)

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        keys = [k for k in features[0] if k != "labels"]
        if tokenizer is not None:
            batch = dict(tokenizer.pad([{k: f[k] for k in keys} for f in features], return_tensors="pt"))
        else:
            width = max(len(f["input_ids"]) for f in features)
            for key in keys:
                rows = [list(f[key]) + [0] * (width - len(f[key])) for f in features]
                batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in features[0]:
            if label_pad is None:
                batch["labels"] = torch.tensor([f["labels"] for f in features])
            else:
                width = batch["input_ids"].shape[1]
                batch["labels"] = torch.tensor(
                    [list(f["labels"]) + [label_pad] * (width - len(f["labels"])) for f in features], dtype=torch.long
                )
        return batch

    return collate


@functools.cache
def _metric(name: str) -> Any:
    from trainer_core.metrics import load_metric

    return load_metric(name)


_SCORING = threading.Lock()
"""One compute at a time per process: an `evaluate` module is one object with its own state and cache file (two
sweep trials evaluating at once in one process read each other's half-written file: ArrowInvalid)."""


def score(names: list[str], predictions: Any, references: Any, extra: dict[str, dict] | None = None) -> dict[str, float]:
    """The named metrics (trainer_core/metrics, offline) of predictions against references."""
    results: dict[str, float] = {}
    with _SCORING:
        for name in names:
            results.update(_metric(name).compute(predictions=predictions, references=references,
                                                 **(extra or {}).get(name, {})))
    return results


def as_model_config(model: Any) -> Any:
    """A transformers config for a model-errors check: the config itself, or one built from a ModelSpec without
    loading weights (random init: from model.config; pretrained: a local folder's config.json). None when only
    the Hub could say (a Hub id): that model is checked when it loads."""
    from pathlib import Path

    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model

    overrides = {k: v for k, v in dict(model.config or {}).items() if k != "model_type"}
    if model.name_or_path is None:
        model_type = (model.config or {}).get("model_type")
        return AutoConfig.for_model(model_type, **overrides) if model_type else None
    if (Path(model.name_or_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(model.name_or_path, **overrides)
    return None


def token_loss_per_example(logits: Any, labels: Any, label_smoothing: float = 0.0) -> Any:
    """Cross-entropy summed over each example's labelled tokens [B] (-100 ignored): tagging, masked LM, seq2seq."""
    import torch.nn.functional as F

    per_token = F.cross_entropy(logits.float().transpose(1, 2), labels.long(), reduction="none",
                                ignore_index=-100, label_smoothing=label_smoothing)
    return per_token.sum(dim=1)


def count_label_tokens(targets: dict[str, Any]) -> Any:
    """Labelled tokens of each example [B]: the items its loss is summed over."""
    return targets["labels"].ne(-100).sum(dim=1)


# pad values of the [B, L] / [B, C, L] tensors a text collator makes (input_ids: the tokenizer's pad id)
_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 0, "position_ids": 0, "labels": -100}


def bucketed(collate: Callable[[list[dict]], dict], multiple: int, pad_token_id: int = 0
             ) -> Callable[[list[dict]], dict]:
    """`collate`, with the sequence length of each batch rounded up to `multiple` (right padding, masked out):
    few distinct shapes for a compiled model. Tensors whose last dimension is not the sequence stay as they are."""
    import torch

    def collate_bucketed(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(features)
        ids = batch.get("input_ids")
        if ids is None or ids.dim() < 2:
            return batch
        length = ids.shape[-1]
        extra = -length % multiple
        if not extra:
            return batch
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != length:
                continue
            if value.dim() > ids.dim():
                raise ValueError(f"trainer.pad_to_multiple_of: batch[{key!r}] is {value.dim()}-D (a packed attention "
                                 "mask?); set trainer.pad_to_multiple_of=null for this task.")
            fill = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            batch[key] = torch.nn.functional.pad(value, (0, extra), value=fill)
        return batch

    return collate_bucketed
