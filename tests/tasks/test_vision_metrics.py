"""trainer_core.metrics.vision against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer_core.metrics import vision


def test_mean_iou_with_an_ignored_index_matches_the_hand_computed_values():
    # (label, prediction) of the counted pixels: (0,0) (1,1) (1,1) (2,1) (2,2); the 255 pixel predicted 0 is ignored
    labels = np.array([[0, 255, 1], [1, 2, 2]])
    predictions = np.array([[0, 0, 1], [1, 1, 2]])
    scores = vision.segmentation_scores(predictions, labels, num_labels=3, ignore_index=255)
    # class 0: 1/1; class 1: intersection 2, union 3 (predicted 3, labelled 2); class 2: 1 / 2
    np.testing.assert_allclose(scores["per_class_iou"], [1.0, 2 / 3, 1 / 2])
    assert scores["mean_iou"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)  # 13/18
    assert scores["pixel_accuracy"] == pytest.approx(4 / 5)


def test_a_class_never_labelled_nor_predicted_is_left_out_of_the_mean():
    labels, predictions = np.array([0, 1, 1, -100]), np.array([0, 1, 0, 3])  # -100: padding, never counted
    scores = vision.segmentation_scores(predictions, labels, num_labels=4)
    iou = scores["per_class_iou"]
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == pytest.approx(1 / 2)
    assert math.isnan(iou[2]) and math.isnan(iou[3])  # class 3's prediction sits on a padded pixel
    assert scores["mean_iou"] == pytest.approx(1 / 2)
    assert scores["pixel_accuracy"] == pytest.approx(2 / 3)


def test_reduce_labels_ignores_background_and_shifts_the_rest():
    assert vision.reduce_labels(np.array([0, 1, 2, 150, 255])).tolist() == [255, 0, 1, 149, 255]


def test_top_k_accuracy_counts_labels_among_the_k_best():
    logits = np.array([[9, 8, 7, 6, 5, 4, 3],   # label 6 is 7th: missed by top-5, label 4 is 5th: hit
                       [9, 8, 7, 6, 5, 4, 3],
                       [0, 0, 0, 0, 0, 0, 1.0]])
    labels = np.array([6, 4, 6])
    assert vision.top_k_accuracy(logits, labels, k=5) == pytest.approx(2 / 3)
    assert vision.top_k_accuracy(logits, labels, k=1) == pytest.approx(1 / 3)
