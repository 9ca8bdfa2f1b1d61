"""Metric modules kept in the repo: `evaluate.load("accuracy")` fetches from the Hub, a folder path does not.

    from trainer_core.metrics import load_metric
    load_metric("f1").compute(predictions=[0, 1], references=[0, 1], average="macro")
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent
AVAILABLE = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of AVAILABLE by folder path (offline)."""
    if name not in AVAILABLE:
        raise ValueError(f"Unknown metric {name!r}: use one of {', '.join(AVAILABLE)} (trainer_core/metrics/).")
    return evaluate.load(str(METRICS_DIR / name))
