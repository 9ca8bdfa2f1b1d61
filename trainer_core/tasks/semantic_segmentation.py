"""Semantic segmentation: one class per pixel (AutoModelForSemanticSegmentation, SegFormer-style).

Raw columns: image, label (a label map: an image of class ids, the image's size). scene_parse_150: image,
annotation; sidewalk-semantic: pixel_values, label. task.options.reduce_labels=true maps 0 ("other",
background) to the ignored 255 and every other id down by one (ADE20K's 1..150 -> 0..149).
Features: `image_bytes` and `labels` (the label map), both lossless PNG at full resolution, `example_id`.
The collator runs the image processor on the images only; label maps stay at full resolution, each flattened
row by row and padded with 255, plus `image_sizes` [B, 2] (height, width): the loss and the evaluation upsample
the logits to each image's own size, so no label is ever resized.
Evaluation returns argmax masks flattened the same way (never the full-resolution logits of every class).
Serves: an image (bytes, base64 string or file path) -> mask (a base64 PNG of class ids, the image's size) and
class_areas (JSON: class name -> pixels).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer_core.tasks import _common, _images
from trainer_core.tasks.base import EvalStep, TaskFamily
from trainer_core.tasks.image_classification import _report, image_errors, role_key

IGNORE = 255
"""Label of pixels no loss and no metric counts (reduce_labels' background, padding inside a batch)."""


@dataclass
class Options:
    reduce_labels: bool = False
    """Label 0 is "other" / background: ignore it (255) and shift every other label down by one."""
    random_flip: bool = False
    """Mirror training images and their label maps left-right with probability 0.5."""


def metric_key(name: str) -> str:
    """A class name as an MLflow-safe metric key part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


class SegmentationCollator:
    """Feature rows -> pixel_values [B, 3, h, w] (the processor's size), labels [B, max H*W] (int16, 255 padded)
    and image_sizes [B, 2]. Training (autograd on, as in ImageCollator) may flip image and map together."""

    def __init__(self, processor: Any, options: Options):
        self.processor, self.options = processor, options

    def label_map(self, value: Any) -> np.ndarray:
        from trainer_core.metrics.vision import reduce_labels

        labels = _images.label_map(value)
        return reduce_labels(labels, IGNORE) if self.options.reduce_labels else labels

    def __call__(self, features: list[dict]) -> dict:
        import torch

        images = [_images.to_rgb(f["image_bytes"]) for f in features]
        maps = [self.label_map(f["labels"]) for f in features] if "labels" in features[0] else None
        if self.options.random_flip and torch.is_grad_enabled():
            from PIL import Image

            for i in range(len(images)):
                if float(torch.rand(())) < 0.5:
                    images[i] = images[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    if maps is not None:
                        maps[i] = maps[i][:, ::-1]
        batch = {
            "pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"],
            "image_sizes": torch.tensor([[image.height, image.width] for image in images], dtype=torch.long),
        }
        if maps is not None:
            width = max(m.size for m in maps)
            labels = np.full((len(maps), width), IGNORE, dtype=np.int16)
            for i, m in enumerate(maps):
                labels[i, : m.size] = m.reshape(-1)
            batch["labels"] = torch.from_numpy(labels)
        return batch


def _size_groups(sizes: Any) -> dict[tuple[int, int], list[int]]:
    """Example indices of a batch by (height, width): one upsampling per size, not per image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes.tolist()):
        groups.setdefault((int(h), int(w)), []).append(i)
    return groups


def upsampled(logits: Any, size: tuple[int, int]) -> Any:
    """Logits [B, C, h, w] bilinearly resized to one label map size (as SegFormer's own loss does)."""
    import torch.nn.functional as F

    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


class SemanticSegmentation(TaskFamily):
    name = "semantic_segmentation"
    roles = {"image": True, "label": True}
    model_input_names = ("pixel_values",)
    target_names = ("labels", "image_sizes")
    Options = Options
    metrics = ("mean_iou", "pixel_accuracy", "per_class_iou")
    sequence_outputs = ("masks", "labels")
    prediction_key = "masks"
    has_length = False

    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        errors = super().config_errors(spec)
        if spec.num_labels < 2:
            errors.append(f"task.num_labels={spec.num_labels}: segmentation needs at least 2 classes.")
        if spec.num_labels > IGNORE:
            errors.append(f"task.num_labels={spec.num_labels}: at most {IGNORE} classes ({IGNORE} is the ignored label).")
        return errors

    def metric_names(self) -> list[str]:
        # per_class_iou gives one iou_<class> per class that occurs; only the fixed names are always there
        return [m for m in self.spec.metrics if m != "per_class_iou"]

    def input_columns(self) -> list[str]:
        return [self.column("image")]

    def kept_raw_columns(self) -> list[str]:
        return []

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        return []

    def dataset_columns(self) -> tuple[str, ...]:
        return ("image_bytes", "labels")

    def class_names(self) -> list[str]:
        return list(self.spec.label_names) or [str(i) for i in range(self.spec.num_labels)]

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        errors = super().check_raw(raw, scored_splits)
        if errors:
            return errors
        errors += image_errors(self, raw)
        if errors:
            return errors
        for split in scored_splits:
            errors += self.map_errors(raw[split], split)
        return errors

    def map_errors(self, dataset: Any, split: str) -> list[str]:
        """Label maps that cannot be read, differ in size from their image, or hold ids that are no class."""
        image_column, column = self.column("image"), self.column("label")
        key, top = role_key("label"), self.spec.num_labels - 1 + (1 if self.options.reduce_labels else 0)
        bad = []
        images, maps = _images.undecoded(dataset, image_column), _images.undecoded(dataset, column)
        for row, (image, value) in enumerate(zip(images, maps, strict=True)):
            try:
                labels = _images.label_map(value)
            except Exception as exc:
                bad.append(f"{key}={column!r}: row {row} of the {split} split: the segmentation map cannot be "
                           f"decoded ({type(exc).__name__}: {exc}). Fix or drop that row.")
                continue
            width, height = _images.size(image)
            if labels.shape != (height, width):
                bad.append(f"{key}={column!r}: row {row} of the {split} split has a {labels.shape[1]}x"
                           f"{labels.shape[0]} (width x height) segmentation map for a {width}x{height} image "
                           f"({role_key('image')}={image_column!r}); a map must have its image's size.")
                continue
            ids = np.unique(labels)
            wrong = ids[(ids != IGNORE) & ((ids < 0) | (ids > top))]
            if wrong.size:
                shift = " before reduce_labels" if self.options.reduce_labels else ""
                bad.append(f"{key}={column!r}: row {row} of the {split} split has class ids {wrong[:5].tolist()} "
                           f"outside 0..{top}{shift} (task.num_labels={self.spec.num_labels}; {IGNORE} = ignored). "
                           f"Set task.num_labels or task.options.reduce_labels, or fix the map.")
        errors: list[str] = []
        _report(errors, bad)
        return errors

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        image, label = self.column("image"), self.column("label")

        def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            out: dict[str, Any] = {"image_bytes": [_images.to_png(value) for value in batch[image]]}
            if label in batch:
                out["labels"] = [_images.to_png(value) for value in batch[label]]
            out["example_id"] = indices
            return out

        return encode

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForSemanticSegmentation

        return _common.build_model(AutoModelForSemanticSegmentation, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        if tokenizer is None:
            raise ValueError("semantic_segmentation needs the image processor (prepare_data's tokenizer/ folder).")
        return SegmentationCollator(tokenizer, self.options)

    # --- training ------------------------------------------------------------------------------
    def loss(self, outputs: Any, targets: dict[str, Any]) -> Any:
        """Cross-entropy summed over each image's labelled pixels, at the label map's full resolution."""
        import torch
        import torch.nn.functional as F

        if self.loss_hook is not None:
            raise ValueError("trainer.loss: semantic_segmentation computes its loss at each label map's size and "
                             "takes no loss hook; unset trainer.loss.")
        logits, labels, sizes = outputs.logits, targets["labels"], targets["image_sizes"]
        per_example = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
        for (h, w), rows in _size_groups(sizes).items():
            index = torch.tensor(rows, device=logits.device)
            target = labels[index, : h * w].long().reshape(len(rows), h, w)
            target = target.masked_fill(target < 0, IGNORE)  # -100 padding from gathering, if any
            pixel_loss = F.cross_entropy(upsampled(logits[index], (h, w)), target, reduction="none",
                                         ignore_index=IGNORE, label_smoothing=self.label_smoothing)
            per_example = per_example.index_copy(0, index, pixel_loss.sum(dim=(1, 2)))
        return per_example

    def count_items(self, targets: dict[str, Any]) -> Any:
        labels = targets["labels"]
        return ((labels >= 0) & (labels != IGNORE)).sum(dim=1)

    # --- evaluation ----------------------------------------------------------------------------
    def eval_step(self, model: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> EvalStep:
        outputs = model(**inputs)
        masks = self.masks(outputs.logits, targets["image_sizes"])
        small = {"masks": masks, "mask_sizes": targets["image_sizes"]}
        if "labels" not in targets:  # predicting an unlabelled split: sizes only
            return EvalStep(None, None, small)
        return EvalStep(self.loss(outputs, targets), self.count_items(targets), small)

    @staticmethod
    def masks(logits: Any, sizes: Any) -> Any:
        """Argmax class of every pixel at each image's size, flattened row by row, 255 after its end [B, max H*W]."""
        import torch

        width = int((sizes[:, 0] * sizes[:, 1]).max())
        masks = torch.full((logits.shape[0], width), IGNORE, dtype=torch.int16, device=logits.device)
        for (h, w), rows in _size_groups(sizes).items():
            index = torch.tensor(rows, device=logits.device)
            best = upsampled(logits[index], (h, w)).argmax(dim=1).reshape(len(rows), h * w).to(torch.int16)
            masks[index, : h * w] = best
        return masks

    @staticmethod
    def unflatten(flat: np.ndarray, size: Any) -> np.ndarray:
        h, w = (int(v) for v in size)
        return np.asarray(flat)[: h * w].reshape(h, w)

    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Flattened masks -> one 2-D mask per image and its pixels per class (object arrays, one per image)."""
        names = self.class_names()
        masks = [self.unflatten(flat, size) for flat, size in zip(predictions["masks"], predictions["mask_sizes"],
                                                                  strict=True)]
        areas = []
        for mask in masks:
            ids, counts = np.unique(mask, return_counts=True)
            areas.append({names[i]: int(c) for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
                          if 0 <= i < len(names)})
        as_objects = np.empty(len(masks), dtype=object)
        as_objects[:] = masks
        return {"mask": as_objects, "class_areas": np.array(areas, dtype=object)}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        """mean IoU / pixel accuracy over every labelled pixel of the split; iou_<class> for each class that
        occurs in the labels or the predictions (its IoU is undefined otherwise)."""
        from trainer_core.metrics import vision

        scores = vision.segmentation_scores(predictions["masks"], targets["labels"], self.spec.num_labels, IGNORE)
        results = {m: float(scores[m]) for m in self.spec.metrics if m != "per_class_iou"}
        if "per_class_iou" in self.spec.metrics:
            for name, value in zip(self.class_names(), scores["per_class_iou"].tolist(), strict=True):
                if value == value:  # not NaN
                    results[f"iou_{metric_key(name)}"] = float(value)
        return results

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        decoded = self.postprocess(predictions)
        example_ids = dataset["example_id"][:]  # whole column: see text_classification
        truth = dataset["labels"] if scored and "labels" in dataset.column_names else None
        collate = SegmentationCollator(None, self.options)
        for i, mask in enumerate(decoded["mask"]):
            row = {"row_id": example_ids[i], "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                   "mask": _images.png_base64(mask), "class_areas": decoded["class_areas"][i]}
            if truth is not None:
                labels = collate.label_map(truth[i])
                counted = labels != IGNORE
                row["pixel_accuracy"] = round(float((mask[counted] == labels[counted]).mean()), 6) if counted.any() else None
            yield row

    # --- serving -------------------------------------------------------------------------------
    def serving_meta(self) -> dict[str, Any]:
        return {**super().serving_meta(), "label_names": self.class_names()}

    def serving_schema(self) -> dict[str, list]:
        return {"inputs": [["string", None]], "outputs": [["string", "mask"], ["string", "class_areas"]], "params": []}

    def input_example(self, raw_split: Any) -> Any:
        import base64

        return [base64.b64encode(data).decode("ascii") for data in raw_split["image_bytes"][:2]]

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        return (AutoModelForSemanticSegmentation.from_pretrained(folder).eval(),
                AutoImageProcessor.from_pretrained(folder))

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        """One image at a time (each at its own size): mask as a base64 PNG of class ids, areas as JSON."""
        import pandas as pd
        import torch

        from trainer_core.tasks.image_classification import ImageClassification

        masks, areas = [], []
        with torch.inference_mode():
            for row, value in enumerate(frame[self.input_columns()[0]].tolist()):
                image = ImageClassification.decode_input(value, row)
                pixels = processor(images=[image], return_tensors="pt")["pixel_values"].to(model.dtype)
                sizes = torch.tensor([[image.height, image.width]])
                flat = self.masks(model(pixel_values=pixels).logits, sizes).numpy()
                record = self.postprocess({"masks": flat, "mask_sizes": sizes.numpy()})
                masks.append(_images.png_base64(record["mask"][0]))
                areas.append(json.dumps(record["class_areas"][0]))
        return pd.DataFrame({"mask": masks, "class_areas": areas})
