"""Tiny models and synthetic token data for the trainer_core tests (no network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
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
    return get_task(family).build_model(
        ModelSpec(config=dict(TINY_BERT), dropout=dropout), TaskSpec(family=family, num_labels=num_labels)
    )


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


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    # the Trainer reads WORLD_SIZE before building its Accelerator; in-process tests are one process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yield
