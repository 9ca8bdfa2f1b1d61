"""Vision metrics as plain numpy functions (no evaluate module, nothing fetched).

    from trainer_core.metrics import vision
    vision.top_k_accuracy(logits, labels, k=5)
    vision.segmentation_scores(pred_masks, label_masks, num_labels=150, ignore_index=255)

Definitions:
- top-k accuracy: the share of examples whose true class is among the k highest scores (ILSVRC's top-5
  error is 1 - top-5 accuracy; Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", 2015).
- IoU of class c = |pred == c AND label == c| / |pred == c OR label == c|, over all pixels of the whole
  evaluation set (not averaged per image), pixels whose label is the ignored index left out; mean IoU is the
  mean over the classes whose union is not empty. Pixel accuracy = correctly labelled pixels / labelled pixels.
  These are the "total area" definitions of MMSegmentation's `mean_iou` (mmseg/core/evaluation/metrics.py) and
  of the Hugging Face evaluate `mean_iou` metric (with reduce_labels: label 0 becomes the ignored 255, and
  every other label moves down by one).
"""

from __future__ import annotations

import numpy as np


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Share of rows of `logits` [N, C] whose label is among their k largest scores (ties: lower index first)."""
    logits, labels = np.asarray(logits), np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=-1).mean())


def reduce_labels(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """0 (background / "other") -> ignore_index, every other label - 1 (ADE20K's 1..150 become 0..149)."""
    labels = np.asarray(labels).astype(np.int64)
    out = labels - 1
    out[labels == 0] = ignore_index
    out[labels == ignore_index] = ignore_index
    return out


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """[num_labels, num_labels] pixel counts (row: true class, column: predicted class).

    Pixels whose label is outside 0..num_labels-1 (the ignored index, padding) are not counted; a prediction
    outside the range (padding of a mask) on a counted pixel is impossible by construction and is dropped too.
    """
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions have {predictions.size} pixels but labels {labels.size}")
    keep = (labels >= 0) & (labels < num_labels) & (predictions >= 0) & (predictions < num_labels)
    index = labels[keep].astype(np.int64) * num_labels + predictions[keep].astype(np.int64)
    return np.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class that is neither labelled nor predicted (its IoU is undefined)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1), np.nan)


def segmentation_scores(predictions: np.ndarray, labels: np.ndarray, num_labels: int,
                        ignore_index: int = 255) -> dict[str, object]:
    """mean_iou, pixel_accuracy and per_class_iou (array, NaN where undefined) of predicted masks vs labels.

    `predictions` and `labels` have the same shape (any); labels equal to `ignore_index`, or outside
    0..num_labels-1 (padding such as -100), are not counted.
    """
    labels = np.asarray(labels)
    labels = np.where(labels == ignore_index, -1, labels)
    confusion = confusion_matrix(predictions, labels, num_labels)
    per_class = iou_from_confusion(confusion)
    labelled = confusion.sum()
    valid = ~np.isnan(per_class)
    return {
        "mean_iou": float(per_class[valid].mean()) if valid.any() else float("nan"),
        "pixel_accuracy": float(np.diag(confusion).sum() / labelled) if labelled else float("nan"),
        "per_class_iou": per_class,
    }
