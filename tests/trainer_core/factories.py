"""Tiny models and synthetic token data for the trainer_core tests (no network).

    from tests.trainer_core.factories import make_trainer, tiny_model, make_dataset
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


def tiny_model(num_labels: int = 2, dropout: float | None = 0.0, family: str = "text_classification", seed: int = 0):
    from trainer_core.spec import ModelSpec, TaskSpec
    from trainer_core.tasks import get_task

    torch.manual_seed(seed)
    return get_task(family)(TaskSpec(family=family, num_labels=num_labels)).build_model(
        ModelSpec(config=dict(TINY_BERT), dropout=dropout))


def make_dataset(n: int = 48, seed: int = 0, token_level: bool = False, num_labels: int = 2, min_len: int = 4,
                 max_len: int = 12):
    """Variable-length sequences; label = parity of the first token (learnable), token labels with -100 holes."""
    import datasets

    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(5, 100, size=length).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        if token_level:
            labels = [int(t % num_labels) for t in ids]
            holes = rng.random(length) < 0.3
            rows["labels"].append([-100 if h else lab for h, lab in zip(holes, labels, strict=True)])
        else:
            rows["labels"].append(int(ids[0] % num_labels))
    return datasets.Dataset.from_dict(rows)


def make_trainer(output_dir, *, train_n=24, eval_n=12, model=None, callback_objects=None, compute_metrics=None,
                 family="text_classification", metrics=("accuracy",), dropout=0.0, shuffle=True, config_hash="",
                 **overrides):
    """A small Trainer: 24 samples, batch 8, learning rate 1e-2, no tqdm; any TrainingArguments overridable."""
    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import TaskSpec
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    values = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=6, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, seed=11)
    values.update(overrides)
    args = TrainingArguments(**values)
    train = make_dataset(train_n, seed=1, token_level=family == "token_classification")
    evaluation = make_dataset(eval_n, seed=2, token_level=family == "token_classification")
    plan = build_batch_plan(len(train), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                            args.num_train_epochs, args.max_steps, args.seed, shuffle=shuffle)
    if model is None:
        model = tiny_model(dropout=dropout, family=family, seed=3)
    return Trainer(model, args, train_dataset=train, eval_dataset=evaluation, batch_plan=plan,
                   output_dir=output_dir, task=get_task(family), task_spec=TaskSpec(family=family, metrics=list(metrics)),
                   callbacks=callback_objects, compute_metrics=compute_metrics, config_hash=config_hash)


class Scripted:
    """compute_metrics returning a scripted accuracy sequence (one value per evaluation)."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, predictions, label_ids):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"accuracy": value}
