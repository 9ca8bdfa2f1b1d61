"""Token classification (tagging, NER / POS): one label per word, -100 marks tokens without a label.

Raw columns: tokens (a list of words), label (a list of tag ids, one per word; conll2003's `ner_tags`).
Features: the words' sub-tokens, each word's label on its first sub-token (every sub-token with
task.options.label_all_tokens=true), -100 on the others and on special tokens; `word_ids` (-1 for special
tokens) to read one tag per word back; `example_id`.
Metrics: token accuracy, and entity-level precision / recall / F1 (seqeval, strict) for IOB2 / IOBES tags;
with label_scheme=none (POS tags) precision / recall / F1 are token-level macro averages.
Serves: words (a list, or a sentence split on whitespace) -> one tag per word and the entities.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer_core.tasks import _common
from trainer_core.tasks.base import IGNORE_INDEX, TaskFamily

SCHEMES = ("auto", "IOB2", "IOBES", "none")


@dataclass
class Options:
    label_all_tokens: bool = False
    """Label every sub-token of a word with the word's tag (default: only the first; the rest -100)."""
    label_scheme: str = "auto"
    """IOB2 or IOBES: entity-level metrics (seqeval); none: token-level (POS); auto: IOB2 when tags look B-/I-."""


class TokenClassification(TaskFamily):
    name = "token_classification"
    roles = {"tokens": True, "label": True}
    Options = Options
    metrics = ("accuracy", "precision", "recall", "f1")
    sequence_outputs = ("logits", "labels")
    feature_names = ("word_ids",)

    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        errors = super().config_errors(spec)
        scheme = spec.options.get("label_scheme", "auto")
        if scheme not in SCHEMES:
            errors.append(f"task.options.label_scheme={scheme!r}: use one of {', '.join(SCHEMES)}.")
        return errors

    def tag_names(self) -> list[str]:
        return list(self.spec.label_names) or [f"LABEL_{i}" for i in range(self.spec.num_labels)]

    def scheme(self) -> str:
        if self.options.label_scheme != "auto":
            return self.options.label_scheme
        names = self.tag_names()
        prefixed = all(n == "O" or n[:2] in ("B-", "I-", "E-", "S-") for n in names) and any(n != "O" for n in names)
        if not prefixed:
            return "none"
        return "IOBES" if any(n[:2] in ("E-", "S-") for n in names) else "IOB2"

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        errors = super().check_raw(raw, scored_splits)
        if errors:
            return errors
        words, label, num_labels = self.column("tokens"), self.column("label"), self.spec.num_labels
        for split in scored_splits:
            for row, (tokens, tags) in enumerate(zip(raw[split][words], raw[split][label], strict=True)):
                if len(tokens) != len(tags):
                    errors.append(f"task.label_column={label!r}: row {row} of the {split} split has {len(tokens)} "
                                  f"words but {len(tags)} tags; give one tag per word.")
                elif any(not 0 <= int(t) < num_labels for t in tags):
                    errors.append(f"task.num_labels={num_labels}: row {row} of the {split} split has tag ids "
                                  f"{sorted({int(t) for t in tags if not 0 <= int(t) < num_labels})} outside "
                                  f"0..{num_labels - 1}; fix task.label_names / task.num_labels.")
                if len(errors) >= 5:
                    return errors
        return errors

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        words_column, label = self.column("tokens"), self.column("label")
        label_all, max_length = self.options.label_all_tokens, self.spec.max_seq_length

        def align(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            encoded = tokenizer(batch[words_column], is_split_into_words=True, truncation=True, max_length=max_length)
            encoded["word_ids"] = [[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(indices))]
            if label in batch:
                encoded["labels"] = [_align(word_ids, tags, label_all) for word_ids, tags in
                                     zip(encoded["word_ids"], batch[label], strict=True)]
            encoded["example_id"] = indices
            return encoded

        return align

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        return [" ".join(words) for words in raw_split[self.column("tokens")]]

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForTokenClassification

        return _common.build_model(AutoModelForTokenClassification, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        return _common.pad_collator(tokenizer, label_pad=IGNORE_INDEX)

    # --- training ------------------------------------------------------------------------------
    loss_per_example = staticmethod(_common.token_loss_per_example)

    def count_items(self, targets: dict[str, Any]) -> Any:
        return _common.count_label_tokens(targets)

    # --- evaluation ----------------------------------------------------------------------------
    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        logits = np.asarray(predictions["logits"], dtype=np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        ids = probs.argmax(axis=-1)
        return {"prediction": ids, "score": np.take_along_axis(probs, ids[..., None], axis=-1)[..., 0]}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        preds = np.asarray(predictions["logits"])
        if preds.ndim == 3:
            preds = preds.argmax(axis=-1)
        labels = np.asarray(targets["labels"])
        mask = labels != IGNORE_INDEX
        wanted = self.spec.metrics
        results: dict[str, float] = {}
        if "accuracy" in wanted:
            results["accuracy"] = float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0
        entity = [m for m in ("precision", "recall", "f1") if m in wanted]
        if not entity:
            return results
        if self.scheme() == "none":
            return {**results, **token_scores(labels[mask], preds[mask], entity)}
        names = self.tag_names()
        true = [[names[t] for t in row[keep]] for row, keep in zip(labels, mask, strict=True)]
        pred = [[names[p] for p in row[keep]] for row, keep in zip(preds, mask, strict=True)]
        return {**results, **entity_scores(true, pred, self.scheme(), entity)}

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        decoded = self.postprocess(predictions)
        words_column, names = self.column("tokens"), self.tag_names()
        example_ids = dataset["example_id"][:]  # whole columns: see text_classification
        truth = dataset["labels"][:] if scored and "labels" in dataset.column_names else None
        for i, (words, word_ids) in enumerate(zip(dataset[words_column][:], dataset["word_ids"][:], strict=True)):
            tags = _word_tags(word_ids, decoded["prediction"][i], len(words), names)
            row = {"row_id": example_ids[i], words_column: words, "tags": tags, "entities": self._entities(words, tags)}
            if truth is not None:
                row["true_tags"] = _word_tags(word_ids, truth[i], len(words), names, labels=True)
            yield row

    def _entities(self, words: list[str], tags: list[str | None]) -> list[dict[str, Any]]:
        if self.scheme() == "none":
            return []
        from seqeval.metrics.sequence_labeling import get_entities

        return [{"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start : end + 1])}
                for kind, start, end in get_entities([t or "O" for t in tags])]

    # --- serving -------------------------------------------------------------------------------
    def serving_meta(self) -> dict[str, Any]:
        return {**super().serving_meta(), "label_names": self.tag_names()}

    def serving_schema(self) -> dict[str, list]:
        # one unnamed text column (callers pass raw sentences); tags and entities as JSON text
        return {"inputs": [["string", None]], "outputs": [["string", "tags"], ["string", "entities"]], "params": []}

    def input_example(self, raw_split: Any) -> Any:
        return [" ".join(words) for words in raw_split[self.column("tokens")][:2]]

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        return AutoModelForTokenClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        import torch

        names, rows = self.tag_names(), []
        for value in frame[self.column("tokens")].tolist():
            words = value.split() if isinstance(value, str) else [str(w) for w in value]
            encoded = processor([words], is_split_into_words=True, truncation=True,
                                max_length=self.spec.max_seq_length, return_tensors="pt")
            word_ids = [-1 if w is None else w for w in encoded.word_ids(0)]
            with torch.inference_mode():
                ids = model(**encoded).logits[0].argmax(-1).tolist()
            tags = _word_tags(word_ids, ids, len(words), names)
            rows.append({"tags": json.dumps(tags), "entities": json.dumps(self._entities(words, tags))})
        return pd.DataFrame(rows, columns=["tags", "entities"])


def _align(word_ids: list[int], tags: list[int], label_all: bool) -> list[int]:
    """One label per sub-token: the word's tag on its first sub-token (all with label_all), -100 elsewhere."""
    row, previous = [], None
    for word in word_ids:
        if word < 0:
            row.append(IGNORE_INDEX)  # [CLS], [SEP]
        elif word != previous or label_all:
            row.append(int(tags[word]))
        else:
            row.append(IGNORE_INDEX)  # a later sub-token of the same word
        previous = word
    return row


def _word_tags(word_ids: list[int], token_values: Any, num_words: int, names: list[str],
               labels: bool = False) -> list[str | None]:
    """The tag of each word, read at its first sub-token (None for words cut off by max_seq_length)."""
    tags: list[str | None] = [None] * num_words
    for position, word in enumerate(word_ids):
        if word >= 0 and tags[word] is None and position < len(token_values):
            value = int(token_values[position])
            if not labels or value != IGNORE_INDEX:
                tags[word] = names[value]
    return tags


def token_scores(true: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, float]:
    """Token-level precision / recall / F1, macro-averaged over the tags seen (POS tagging)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(true, pred, average="macro", zero_division=0)
    values = {"precision": precision, "recall": recall, "f1": f1}
    return {name: float(values[name]) for name in names}


def entity_scores(true: list[list[str]], pred: list[list[str]], scheme: str, names: list[str]) -> dict[str, float]:
    """Entity-level precision / recall / F1 (seqeval, strict mode: an entity counts when its type and exact
    boundaries match; conlleval's definition)."""
    from seqeval import metrics
    from seqeval.scheme import IOB2, IOBES

    kwargs = {"mode": "strict", "scheme": IOB2 if scheme == "IOB2" else IOBES, "zero_division": 0}
    functions = {"precision": metrics.precision_score, "recall": metrics.recall_score, "f1": metrics.f1_score}
    return {name: float(functions[name](true, pred, **kwargs)) for name in names}
