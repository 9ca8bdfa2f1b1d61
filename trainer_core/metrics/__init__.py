"""Metric modules kept in the repo: `evaluate.load("accuracy")` fetches from the Hub, a folder path does not.

    from trainer_core.metrics import load_metric
    load_metric("f1").compute(predictions=[0, 1], references=[0, 1], average="macro")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).parent
AVAILABLE = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")


def load_metric(name: str) -> Any:
    """Load one of AVAILABLE by folder path (offline): an evaluate.EvaluationModule."""
    import evaluate  # heavy (and it imports datasets): only where a metric is computed, not at validation

    if name not in AVAILABLE:
        raise ValueError(f"Unknown metric {name!r}: use one of {', '.join(AVAILABLE)} (trainer_core/metrics/).")
    return evaluate.load(str(METRICS_DIR / name))


def is_better(value: float, best: float | None, greater_is_better: bool, threshold: float = 0.0) -> bool:
    """Whether `value` improves on `best` by more than `threshold` (None: there is no best yet).

    The one rule for the best checkpoint, early stopping and the registry's champion gate. NaN never improves.
    """
    if value != value:  # NaN
        return False
    if best is None:
        return True
    return value > best + threshold if greater_is_better else value < best - threshold
