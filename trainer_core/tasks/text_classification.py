"""Sequence classification (single sentences or pairs) and regression (num_labels == 1).

Raw columns: text, text_pair (optional), label (a class id, or a float for regression).
Features: the tokenizer's ids of text (and text_pair), `labels`, `example_id`. One feature per example.
Serves: text (or the pair's two columns) -> label, score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from trainer_core.tasks import _common
from trainer_core.tasks.base import TaskFamily


class TextClassification(TaskFamily):
    name = "text_classification"
    roles = {"text": True, "text_pair": False, "label": True}
    metrics = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")

    @property
    def regression(self) -> bool:
        return self.spec.num_labels == 1

    def text_columns(self) -> list[str]:
        return [c for c in (self.column("text"), self.column("text_pair")) if c]

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        errors = super().check_raw(raw, scored_splits)
        if errors or self.regression:
            return errors  # regression: any float is a label
        num_labels, label = self.spec.num_labels, self.column("label")
        for split in scored_splits:
            labels = np.asarray(raw[split][label])
            bad = labels[(labels < 0) | (labels >= num_labels)]
            if bad.size:
                errors.append(
                    f"task.num_labels={num_labels}: the {split} split has labels outside 0..{num_labels - 1} "
                    f"({bad.size} rows, e.g. {sorted(set(bad.tolist()))[:5]}). Set task.num_labels to the number "
                    f"of classes, or fix task.label_column={label!r}."
                )
        return errors

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        text_columns, label, max_length = self.text_columns(), self.column("label"), self.spec.max_seq_length

        def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length)
            encoded["labels"] = batch[label]
            encoded["example_id"] = indices
            return encoded

        return tokenize

    def kept_raw_columns(self) -> list[str]:
        return self.text_columns()

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        return _common.build_model(AutoModelForSequenceClassification, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        return _common.pad_collator(tokenizer)

    # --- training ------------------------------------------------------------------------------
    @staticmethod
    def loss_per_example(logits: Any, labels: Any, label_smoothing: float = 0.0) -> Any:
        """Cross-entropy per example (MSE for regression); the trainer sums and normalises."""
        import torch.nn.functional as F

        if logits.shape[-1] == 1:
            return (logits.squeeze(-1).float() - labels.float()) ** 2
        return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)

    # --- evaluation ----------------------------------------------------------------------------
    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Logits -> predicted label ids and their softmax score (the raw value for regression)."""
        logits = np.asarray(predictions["logits"], dtype=np.float64)
        if self.regression:
            return {"prediction": logits.reshape(-1), "score": logits.reshape(-1)}
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        label_ids = probs.argmax(axis=-1)
        return {"prediction": label_ids, "score": probs[np.arange(len(probs)), label_ids]}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        preds = np.asarray(predictions["logits"])
        # logits in, unless preprocess_logits_for_metrics already reduced them to ids
        if preds.ndim > 1:
            preds = preds.reshape(-1) if self.regression else preds.argmax(axis=-1)
        average = "binary" if self.spec.num_labels == 2 else "macro"
        return _common.score(self.spec.metrics, preds, targets["labels"], {"f1": {"average": average}})

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        decoded = self.postprocess(predictions)
        names = self.spec.label_names
        # whole columns ([:]): a datasets Column read item by item selects the column again for each row
        columns = {c: dataset[c][:] for c in self.text_columns()}
        example_ids = dataset["example_id"][:]
        truth = dataset["labels"][:] if scored else None
        for i, label_id in enumerate(decoded["prediction"].tolist()):
            row = {"row_id": example_ids[i], **{c: values[i] for c, values in columns.items()}}
            row["label"] = names[label_id] if names and isinstance(label_id, int) else label_id
            row.update(label_id=label_id, score=round(float(decoded["score"][i]), 6))
            if truth is not None:
                row["true_label"] = truth[i]
            yield row

    # --- serving -------------------------------------------------------------------------------
    def serving_meta(self) -> dict[str, Any]:
        meta = super().serving_meta()
        # read by models registered before the task-family contract, and by flows.predict
        meta.update(text_columns=self.text_columns(), label_names=list(self.spec.label_names),
                    max_seq_length=self.spec.max_seq_length)
        return meta

    def input_columns(self) -> list[str]:
        return self.text_columns()

    def serving_schema(self) -> dict[str, list]:
        columns = self.text_columns()
        # one unnamed string column: callers pass raw strings (or any one-column frame) and MLflow accepts them
        inputs = [["string", None]] if len(columns) == 1 else [["string", c] for c in columns]
        label_type = "double" if self.regression else "string"
        return {"inputs": inputs, "outputs": [[label_type, "label"], ["double", "score"]], "params": []}

    def input_example(self, raw_split: Any) -> Any:
        columns = self.text_columns()
        if len(columns) == 1:
            return list(raw_split[columns[0]][:2])
        import pandas as pd

        return pd.DataFrame({c: raw_split[c][:2] for c in columns})

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        import torch

        batch_size = int((params or {}).get("batch_size", 64))
        texts = [frame[c].astype(str).tolist() for c in self.text_columns()]
        names, labels, scores = self.spec.label_names, [], []
        with torch.inference_mode():
            for start in range(0, len(frame), batch_size):
                chunk = [column[start : start + batch_size] for column in texts]
                encoded = processor(*chunk, truncation=True, max_length=self.spec.max_seq_length, padding=True,
                                    return_tensors="pt")
                logits = model(**encoded).logits.float()
                if self.regression:
                    labels += logits[:, 0].tolist()
                    scores += logits[:, 0].tolist()
                    continue
                probs = logits.softmax(-1)
                best = probs.argmax(-1)
                labels += [names[i] if names else str(i) for i in best.tolist()]
                scores += probs.gather(1, best[:, None])[:, 0].tolist()
        return pd.DataFrame({"label": labels, "score": scores})
