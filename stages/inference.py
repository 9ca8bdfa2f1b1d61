"""What evaluate and predict share: a trainer_core Trainer on the finished model, in this process."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from stages.refs import DatasetRef, ModelRef
from trainer_core.spec import RunSpec


def inference_trainer(model: ModelRef, data: DatasetRef, out_dir: Path) -> Any:
    """A Trainer on model.path that scores `data`; it writes its logs into out_dir, not the training run."""
    from trainer_core.run import build_trainer

    spec = dataclasses.replace(
        RunSpec.load(model.spec_path), dataset_dir=data.dataset_dir, tokenizer_dir=data.tokenizer_dir,
        output_dir=str(out_dir),
    )
    return build_trainer(spec, model_dir=model.path, with_train=False)


def by_length(dataset: Any, family: Any) -> tuple[Any, np.ndarray]:
    """The rows sorted by length (far less padding per batch) and the permutation that restores their order.

    Inputs without a length (images) keep their order."""
    lengths = family.lengths(dataset)
    order = np.arange(len(dataset)) if lengths is None else np.argsort(lengths, kind="stable")
    return dataset.select(order), np.argsort(order)
