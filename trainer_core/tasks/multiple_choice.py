"""Multiple choice (SWAG, HellaSwag-like): pick the ending that follows a context.

Raw columns (task.columns): context (SWAG's `sent1`), question_header (optional, `sent2`: the start of the
ending), endings (a list of columns, SWAG's [ending0, ending1, ending2, ending3], or one column holding a list of
choices per row) and label (the index of the right choice).
Features: each choice is tokenized as the pair (context, question_header + " " + ending), so one example is
[C, L] ids; the collator pads a batch to [B, C, L]; the model (AutoModelForMultipleChoice) scores [B, C].
Metric: accuracy. Serves: context (+ question_header) + choices -> index, score, scores of every choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from trainer_core.tasks import _common
from trainer_core.tasks.base import TaskFamily


def _softmax(logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


class MultipleChoice(TaskFamily):
    name = "multiple_choice"
    roles = {"context": True, "question_header": False, "endings": True, "label": True}
    metrics = ("accuracy",)

    # --- config --------------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        errors = []
        for error in super().config_errors(spec):
            for role in ("context", "question_header", "endings"):
                error = error.replace(f"task.{role}_column:", f"task.columns.{role}:")
            errors.append(error)
        endings = spec.columns.get("endings")
        if isinstance(endings, (list, tuple)) and len(endings) < 2:
            errors.append(f"task.columns.endings={list(endings)}: give at least two ending columns "
                          "(SWAG: [ending0, ending1, ending2, ending3]).")
        return errors

    def ending_columns(self) -> list[str]:
        """The ending columns (SWAG layout); one column holding a list of choices per row gives [that column]."""
        endings = self.column("endings")
        return [endings] if isinstance(endings, str) else list(endings)

    @property
    def choices_in_one_column(self) -> bool:
        return isinstance(self.column("endings"), str)

    def input_columns(self) -> list[str]:
        return [c for c in (self.column("context"), self.column("question_header")) if c] + self.ending_columns()

    def kept_raw_columns(self) -> list[str]:
        return self.input_columns()

    def _choices(self, batch: dict[str, list], row: int) -> list[Any]:
        if self.choices_in_one_column:
            return list(batch[self.ending_columns()[0]][row] or [])
        return [batch[c][row] for c in self.ending_columns()]

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        """Columns present (the base check does not look into the list of ending columns), the same number of
        non-empty choices on every row, and labels that index a choice."""
        errors = []
        for split, dataset in raw.items():
            for role, column in (("context", self.column("context")), ("question_header", self.column("question_header")),
                                 ("label", self.column("label"))):
                if column is not None and column not in dataset.column_names:
                    errors.append(f"task.{'label_column' if role == 'label' else 'columns.' + role}={column!r}: the "
                                  f"{split} split has no such column (columns: {', '.join(dataset.column_names)}).")
            missing = [c for c in self.ending_columns() if c not in dataset.column_names]
            if missing:
                errors.append(f"task.columns.endings: the {split} split has no column {', '.join(map(repr, missing))} "
                              f"(columns: {', '.join(dataset.column_names)}).")
        if errors:
            return sorted(set(errors))
        expected = None  # the choice count of the first row seen: every row of every split must match it
        for split, dataset in raw.items():
            batch = {c: dataset[c] for c in self.ending_columns()}
            for row in range(len(dataset)):
                choices = self._choices(batch, row)
                empty = [i for i, text in enumerate(choices) if text is None or not str(text).strip()]
                count = len(choices) - len(empty)
                if expected is None:
                    expected = (count, split, row)
                if empty or count != expected[0]:
                    where = (f"choice {empty[0]} ({self._choice_name(empty[0])}) is empty" if empty
                             else f"it has {count} choices")
                    errors.append(
                        f"task.columns.endings: the {split} split row {row} has {count} choices ({where}) but "
                        f"{expected[1]} row {expected[2]} has {expected[0]}: every row needs the same number of "
                        "non-empty choices. Fix or drop that row."
                    )
                    return errors
        label = self.column("label")
        num_choices = expected[0] if expected else 0
        for split in scored_splits:
            if split not in raw:
                continue
            labels = np.asarray(raw[split][label])
            bad = np.flatnonzero((labels < 0) | (labels >= num_choices))
            if bad.size:
                errors.append(
                    f"task.label_column={label!r}: the {split} split row {int(bad[0])} has label {labels[bad[0]]} "
                    f"({bad.size} rows outside 0..{num_choices - 1}, the index of the right choice). Fix those rows, "
                    "or set task.test_has_labels=false for an unlabelled test split."
                )
        return errors

    def _choice_name(self, index: int) -> str:
        columns = self.ending_columns()
        return f"column {columns[0]!r}[{index}]" if self.choices_in_one_column else f"column {columns[index]!r}"

    def _pairs(self, batch: dict[str, list], rows: int) -> tuple[list[str], list[str], list[int]]:
        """Flattened (context, header + ending) pairs of every choice, and the choice count of each row."""
        context, header = self.column("context"), self.column("question_header")
        firsts, seconds, counts = [], [], []
        for row in range(rows):
            choices = self._choices(batch, row)
            head = str(batch[header][row]) if header else ""
            firsts += [str(batch[context][row])] * len(choices)
            seconds += [f"{head} {ending}".strip() for ending in choices]
            counts.append(len(choices))
        return firsts, seconds, counts

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        label, max_length = self.column("label"), self.spec.max_seq_length

        def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            firsts, seconds, counts = self._pairs(batch, len(indices))
            flat = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
            encoded: dict[str, list] = {}
            for key, values in flat.items():
                rows, offset = [], 0
                for count in counts:  # back to one [C, L] row per example
                    rows.append(values[offset : offset + count])
                    offset += count
                encoded[key] = rows
            if label in batch:
                encoded["labels"] = [int(x) for x in batch[label]]
            encoded["example_id"] = indices
            return encoded

        return tokenize

    def lengths(self, features: Any) -> list[int]:
        # a batch pads every choice to the longest one
        return [max(len(choice) for choice in ids) for ids in features["input_ids"]]

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        batch = {c: raw_split[c] for c in self.input_columns()}
        firsts, seconds, _ = self._pairs(batch, len(raw_split))
        return sorted(set(firsts)) + seconds

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForMultipleChoice

        return _common.build_model(AutoModelForMultipleChoice, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        """[B] examples of [C, L_c] ids -> [B, C, L] tensors (every choice padded to the batch's longest)."""
        import torch

        inputs = self.model_input_names

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            num_choices = len(features[0]["input_ids"])
            keys = [k for k in inputs if k in features[0]]
            flat = [{k: f[k][c] for k in keys} for f in features for c in range(num_choices)]
            if tokenizer is not None:
                padded = dict(tokenizer.pad(flat, return_tensors="pt"))
            else:
                width = max(len(r["input_ids"]) for r in flat)
                padded = {k: torch.tensor([list(r[k]) + [0] * (width - len(r[k])) for r in flat]) for k in keys}
            batch = {k: v.view(len(features), num_choices, -1) for k, v in padded.items()}
            if "labels" in features[0]:
                batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
            return batch

        return collate

    # --- training ------------------------------------------------------------------------------
    @staticmethod
    def loss_per_example(logits: Any, labels: Any, label_smoothing: float = 0.0) -> Any:
        """Cross-entropy over the choices' scores [B, C], per example."""
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)

    # --- evaluation ----------------------------------------------------------------------------
    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Choice scores [N, C] -> the chosen index, its softmax score and every choice's score."""
        probs = _softmax(np.asarray(predictions["logits"], dtype=np.float64))
        chosen = probs.argmax(axis=-1)
        return {"prediction": chosen, "score": probs[np.arange(len(probs)), chosen], "scores": probs}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        preds = np.asarray(predictions["logits"])
        if preds.ndim > 1:
            preds = preds.argmax(axis=-1)
        return _common.score(self.spec.metrics, preds, np.asarray(targets["labels"]))

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        decoded = self.postprocess(predictions)
        columns = {c: dataset[c][:] for c in self.input_columns()}  # whole columns: see text_classification
        example_ids = dataset["example_id"][:]
        truth = dataset["labels"][:] if scored else None
        for i, chosen in enumerate(decoded["prediction"].tolist()):
            row = {"row_id": example_ids[i], **{c: values[i] for c, values in columns.items()}}
            row.update(label=chosen, score=round(float(decoded["score"][i]), 6),
                       scores=[round(float(s), 6) for s in decoded["scores"][i]])
            if truth is not None:
                row["true_label"] = truth[i]
            yield row

    # --- serving -------------------------------------------------------------------------------
    def serving_schema(self) -> dict[str, list]:
        # one list-valued column of choices would need an array type in the signature: SWAG's layout is strings
        inputs = [["string", c] for c in self.input_columns()]
        outputs = [["long", "index"], ["double", "score"]] + [["double", f"score_{i}"] for i in range(self._num_choices())]
        return {"inputs": inputs, "outputs": outputs, "params": []}

    def _num_choices(self) -> int:
        return 0 if self.choices_in_one_column else len(self.ending_columns())

    def input_example(self, raw_split: Any) -> Any:
        import pandas as pd

        return pd.DataFrame({c: raw_split[c][:2] for c in self.input_columns()})

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForMultipleChoice, AutoTokenizer

        return AutoModelForMultipleChoice.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        import torch

        batch_size = int((params or {}).get("batch_size", 32))
        batch = {c: frame[c].tolist() for c in self.input_columns()}
        features = self.preprocess(processor)(batch, list(range(len(frame))))
        collate = self.collator(processor, model)
        keys = [k for k in self.model_input_names if k in features]
        probs = []
        with torch.inference_mode():
            for first in range(0, len(frame), batch_size):
                rows = [{k: features[k][i] for k in keys} for i in range(first, min(first + batch_size, len(frame)))]
                probs += model(**collate(rows)).logits.float().softmax(-1).tolist()
        chosen = [int(np.argmax(p)) for p in probs]
        out = pd.DataFrame({"index": chosen, "score": [p[c] for p, c in zip(probs, chosen, strict=True)]})
        for i in range(self._num_choices()):
            out[f"score_{i}"] = [p[i] for p in probs]
        return out
