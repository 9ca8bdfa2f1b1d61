"""What evaluate and predict share: a trainer_core Trainer on the finished model, in this process."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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
