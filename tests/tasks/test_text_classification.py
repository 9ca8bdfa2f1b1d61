"""Text classification metrics against hand-computed values: Matthews correlation (CoLA), F1, regression."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer_core.spec import TaskSpec
from trainer_core.tasks import get_task


def _logits(ids: list[int], classes: int = 2) -> np.ndarray:
    return np.eye(classes)[ids] * 3.0


def test_matthews_correlation_by_hand():
    family = get_task("text_classification")(TaskSpec(metrics=["matthews_correlation", "f1", "accuracy"]))
    labels, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # TP = 2, FN = 1, TN = 1, FP = 1: MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 1 / 6
    got = family.compute_metrics({"logits": _logits(preds)}, {"labels": np.array(labels)})
    assert got["matthews_correlation"] == pytest.approx(1 / 6)
    assert got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # binary F1 = 2TP / (2TP + FP + FN)
    assert got["accuracy"] == pytest.approx(3 / 5)


def test_regression_scores_the_raw_value():
    family = get_task("text_classification")(TaskSpec(num_labels=1, metrics=["pearsonr", "spearmanr"]))
    preds = np.array([[0.1], [0.4], [0.35], [0.8]])
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    got = family.compute_metrics({"logits": preds}, {"labels": labels})
    x, y = preds[:, 0], labels
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert got["pearsonr"] == pytest.approx(pearson)
    assert got["spearmanr"] == pytest.approx(1 - 6 * (0 + 1 + 1 + 0) / (4 * (16 - 1)))  # ranks 1,3,2,4 vs 1,2,3,4
