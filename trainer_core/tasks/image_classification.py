"""Image classification: one class per image (AutoModelForImageClassification + AutoImageProcessor).

Raw columns: image (datasets' Image feature, bytes, a path), label (a class id, or a class name from
task.label_names). beans: image, labels; cifar10: img, label; an imagefolder: image, label.
Features: `image_bytes` (the image as lossless PNG: a small cache, no pixel values stored), `labels`,
`example_id`. The collator decodes, augments at train time (task.options) and runs the image processor.
Serves: an image (bytes, base64 string or file path) -> label, score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer_core.tasks import _common, _images
from trainer_core.tasks.base import TaskFamily

TOP_K = 5


@dataclass
class Options:
    random_flip: bool = False
    """Mirror training images left-right with probability 0.5 (off: digits and text are not mirror-symmetric)."""
    random_crop_scale: float = 1.0
    """Training images are cropped to a random box of at least this share of their area (1.0: no crop)."""


def role_key(role: str) -> str:
    """The config key that names a role's column (for messages)."""
    return f"task.{role}_column" if role in ("text", "text_pair", "label") else f"task.columns.{role}"


def _report(errors: list[str], bad: list[str], limit: int = 5) -> None:
    errors.extend(bad[:limit])
    if len(bad) > limit:
        errors.append(f"... and {len(bad) - limit} more such rows.")


def image_errors(family: TaskFamily, raw: Any, role: str = "image") -> list[str]:
    """Rows whose image cannot be decoded, in every split (all of them are read later)."""
    column, errors = family.column(role), []
    for split, dataset in raw.items():
        if column not in dataset.column_names:
            continue
        bad = []
        for row, value in enumerate(_images.undecoded(dataset, column)):
            problem = "the value is empty" if value is None else _images.open_error(value)
            if problem:
                bad.append(f"{role_key(role)}={column!r}: row {row} of the {split} split cannot be decoded as an "
                           f"image ({problem}). Fix or drop that row.")
        _report(errors, bad)
    return errors


class ImageCollator:
    """Feature rows (image_bytes, labels) -> pixel_values [B, 3, H, W] and labels [B]; augments while training.

    Training is told apart by autograd: the trainer evaluates under torch.no_grad() and serving under
    inference_mode, so augmentation never reaches an evaluation batch (the DataLoader's workers would break
    that: the trainer builds its loaders with num_workers=0). Random draws come from torch's RNG, which the
    trainer seeds and checkpoints: a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, processor: Any, options: Options):
        self.processor, self.options = processor, options

    def augment(self, image: Any) -> Any:
        import torch
        from PIL import Image

        scale = self.options.random_crop_scale
        if scale < 1.0:
            width, height = image.size
            area = float(torch.empty(()).uniform_(scale, 1.0)) ** 0.5  # side factor of the kept box
            w, h = max(1, round(width * area)), max(1, round(height * area))
            left = int(torch.randint(0, width - w + 1, ()))
            top = int(torch.randint(0, height - h + 1, ()))
            image = image.crop((left, top, left + w, top + h))
        if self.options.random_flip and float(torch.rand(())) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __call__(self, features: list[dict]) -> dict:
        import torch

        images = [_images.to_rgb(f["image_bytes"]) for f in features]
        if torch.is_grad_enabled():
            images = [self.augment(image) for image in images]
        batch = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


class ImageClassification(TaskFamily):
    name = "image_classification"
    roles = {"image": True, "label": True}
    model_input_names = ("pixel_values",)
    Options = Options
    metrics = ("accuracy", "top5_accuracy")
    has_length = False

    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        errors = super().config_errors(spec)
        if "top5_accuracy" in spec.metrics and spec.num_labels <= TOP_K:
            errors.append(f"task.metrics: top5_accuracy needs more than {TOP_K} classes (task.num_labels="
                          f"{spec.num_labels}: it would always be 1.0); drop it.")
        if spec.num_labels < 2:
            errors.append(f"task.num_labels={spec.num_labels}: image classification needs at least 2 classes.")
        scale = spec.options.get("random_crop_scale", 1.0)
        if not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
            errors.append(f"task.options.random_crop_scale={scale!r}: must be within (0, 1] (1.0: no crop).")
        return errors

    def input_columns(self) -> list[str]:
        return [self.column("image")]

    def kept_raw_columns(self) -> list[str]:
        return []  # the image travels as image_bytes; predictions name rows by row_id

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        return []

    def dataset_columns(self) -> tuple[str, ...]:
        return ("image_bytes", *self.target_names)

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        errors = super().check_raw(raw, scored_splits)
        if errors:
            return errors
        errors += image_errors(self, raw)
        for split in scored_splits:
            errors += self.label_errors(raw[split], split)
        return errors

    def label_errors(self, dataset: Any, split: str) -> list[str]:
        """Labels that are not classes: ids outside 0..num_labels-1, names not in task.label_names, or a
        ClassLabel whose names disagree with task.label_names (ids would mean other classes)."""
        import datasets

        column, names, num_labels = self.column("label"), list(self.spec.label_names), self.spec.num_labels
        key, feature = role_key("label"), dataset.features[column]
        if isinstance(feature, datasets.ClassLabel) and names and feature.names != names:
            return [f"task.label_names: the {split} split's {column!r} is a ClassLabel with names {feature.names} "
                    f"(in this order), task.label_names is {names}. Set task.label_names to the dataset's names."]
        bad = []
        for row, label in enumerate(dataset[column]):
            if isinstance(label, str):
                if label not in names:
                    bad.append(f"{key}={column!r}: row {row} of the {split} split has label {label!r}, which is not "
                               f"in task.label_names ({', '.join(names) or 'empty'}). Add it or fix the row.")
            elif label is None or not 0 <= int(label) < num_labels:
                bad.append(f"{key}={column!r}: row {row} of the {split} split has label {label!r}, outside "
                           f"0..{num_labels - 1}. Set task.num_labels to the number of classes, or fix the row.")
        errors: list[str] = []
        _report(errors, bad)
        return errors

    def label_id(self, label: Any) -> int:
        return self.spec.label_names.index(label) if isinstance(label, str) else int(label)

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        image, label = self.column("image"), self.column("label")

        def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            out: dict[str, Any] = {"image_bytes": [_images.to_png(value) for value in batch[image]]}
            if label in batch:
                out["labels"] = [self.label_id(value) for value in batch[label]]
            out["example_id"] = indices
            return out

        return encode

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForImageClassification

        return _common.build_model(AutoModelForImageClassification, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        if tokenizer is None:
            raise ValueError("image_classification needs the image processor (prepare_data's tokenizer/ folder).")
        return ImageCollator(tokenizer, self.options)

    # --- training ------------------------------------------------------------------------------
    @staticmethod
    def loss_per_example(logits: Any, labels: Any, label_smoothing: float = 0.0) -> Any:
        """Cross-entropy of each image; the trainer sums and normalises by the window's images."""
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)

    # --- evaluation ----------------------------------------------------------------------------
    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Class logits -> predicted class ids and their softmax probability."""
        logits = np.asarray(predictions["logits"], dtype=np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        label_ids = probs.argmax(axis=-1)
        return {"prediction": label_ids, "score": probs[np.arange(len(probs)), label_ids]}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        from trainer_core.metrics import vision

        logits, labels = np.asarray(predictions["logits"]), np.asarray(targets["labels"]).reshape(-1)
        results = {}
        if "accuracy" in self.spec.metrics:
            results["accuracy"] = vision.top_k_accuracy(logits, labels, k=1)
        if "top5_accuracy" in self.spec.metrics:
            results["top5_accuracy"] = vision.top_k_accuracy(logits, labels, k=TOP_K)
        return results

    def label_name(self, label_id: int) -> str:
        names = self.spec.label_names
        return names[label_id] if names else str(label_id)

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        decoded = self.postprocess(predictions)
        example_ids = dataset["example_id"][:]  # whole columns: see text_classification
        truth = dataset["labels"][:] if scored and "labels" in dataset.column_names else None
        for i, label_id in enumerate(decoded["prediction"].tolist()):
            row = {"row_id": example_ids[i], "label": self.label_name(label_id), "label_id": label_id,
                   "score": round(float(decoded["score"][i]), 6)}
            if truth is not None:
                row["true_label"] = truth[i]
            yield row

    # --- serving -------------------------------------------------------------------------------
    def serving_meta(self) -> dict[str, Any]:
        return {**super().serving_meta(), "label_names": list(self.spec.label_names)}

    def serving_schema(self) -> dict[str, list]:
        # one unnamed string column: a base64-encoded image or a path to an image file (bytes work in-process)
        return {"inputs": [["string", None]], "outputs": [["string", "label"], ["double", "score"]], "params": []}

    def input_example(self, raw_split: Any) -> Any:
        import base64

        return [base64.b64encode(data).decode("ascii") for data in raw_split["image_bytes"][:2]]

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        import torch

        batch_size = int((params or {}).get("batch_size", 32))
        values = frame[self.input_columns()[0]].tolist()
        labels, scores = [], []
        with torch.inference_mode():
            for start in range(0, len(values), batch_size):
                images = [self.decode_input(v, start + i) for i, v in enumerate(values[start : start + batch_size])]
                pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(model.dtype)
                probs = model(pixel_values=pixels).logits.float().softmax(-1)
                best = probs.argmax(-1)
                labels += [self.label_name(i) for i in best.tolist()]
                scores += probs.gather(1, best[:, None])[:, 0].tolist()
        return pd.DataFrame({"label": labels, "score": scores})

    @staticmethod
    def decode_input(value: Any, row: int) -> Any:
        """A served input as an RGB image; a bad one is refused naming its row."""
        try:
            return _images.to_rgb(value)
        except Exception as exc:
            raise ValueError(f"input row {row}: not an image (give image bytes, a base64 string or a file path): "
                             f"{exc}") from None
