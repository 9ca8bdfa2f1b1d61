"""Extractive question answering (SQuAD v1.1 / v2.0): the answer is a span of the context, or none (v2).

Raw columns (task.columns): question, context, answers ({"text": [...], "answer_start": [...]}, SQuAD's
schema; empty lists for an unanswerable v2 question) and optionally id.
Features: a context longer than task.max_seq_length is cut into overlapping windows (task.options.doc_stride
tokens of overlap), each window one feature with `example_id`, the target token span
(start_positions / end_positions; [CLS] = 0 when the answer is not inside the window), and its
`offset_mapping` (character span of each token, None outside the context) for post-processing. The raw
question / context / answers ride along on every feature (the metrics need the context and gold answers).
Evaluation keeps the start / end logits [B, L]; post-processing picks, for each example, the best span over
all its windows (n_best_size starts x ends, at most max_answer_length tokens), or "" in v2 when the null score
beats it by more than null_score_diff_threshold (as in transformers' examples/pytorch/question-answering).
Serves: question + context -> answer, score, start, end (character span, end exclusive; -1 for no answer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer_core.tasks import _common
from trainer_core.tasks.base import TaskFamily


@dataclass
class Options:
    doc_stride: int = 128
    """Tokens shared by two consecutive windows of a long context (must be < task.max_seq_length)."""
    version_2_with_negative: bool = False
    """SQuAD v2: questions may have no answer (empty answers); predict "" when the null score wins."""
    n_best_size: int = 20
    """Start and end candidates per window looked at in post-processing."""
    max_answer_length: int = 30
    """Longest answer, in tokens."""
    null_score_diff_threshold: float = 0.0
    """v2: predict no answer when null score - best span score exceeds this."""


class QuestionAnswering(TaskFamily):
    name = "question_answering"
    roles = {"question": True, "context": True, "answers": True, "id": False}
    target_names = ("start_positions", "end_positions")
    feature_names = ("offset_mapping",)
    Options = Options
    metrics = ("exact_match", "f1")
    sequence_outputs = ("start_logits", "end_logits")
    prediction_key = "start_logits"

    # --- config --------------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        # these roles are set under task.columns (task.columns.question=...), not as task.<role>_column
        errors = [re.sub(r"^task\.(\w+)_column:", r"task.columns.\1:", e) for e in super().config_errors(spec)]
        options = spec.options
        stride = options.get("doc_stride", Options.doc_stride)
        if not isinstance(stride, int) or not 0 <= stride < spec.max_seq_length:
            errors.append(f"task.options.doc_stride={stride}: must be an integer in 0..task.max_seq_length-1 "
                          f"({spec.max_seq_length - 1}); the usual value is max_seq_length // 3.")
        for key in ("n_best_size", "max_answer_length"):
            value = options.get(key, getattr(Options, key))
            if not isinstance(value, int) or value < 1:
                errors.append(f"task.options.{key}={value}: must be a positive integer.")
        return errors

    def input_columns(self) -> list[str]:
        return [self.column("question"), self.column("context")]

    def kept_raw_columns(self) -> list[str]:
        return [c for c in (self.column("question"), self.column("context"), self.column("answers"),
                            self.column("id")) if c]

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        """Columns present, and every gold answer of a scored split lies in its context at answer_start."""
        errors = super().check_raw(raw, scored_splits)
        if errors:
            return errors
        context_col, answers_col = self.column("context"), self.column("answers")
        v2 = self.options.version_2_with_negative
        for split in scored_splits:
            if split not in raw:
                continue
            contexts, answers = raw[split][context_col], raw[split][answers_col]
            bad: list[str] = []
            for row, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
                problem = self._answer_problem(context, answer, v2)
                if problem:
                    bad.append(f"row {row}: {problem}")
            if bad:
                shown = "; ".join(bad[:3]) + (f"; ... ({len(bad)} rows)" if len(bad) > 3 else "")
                errors.append(
                    f"task.columns.answers={answers_col!r}: the {split} split has answers that are not in their "
                    f"context (column {context_col!r}): {shown}. Fix answer_start / text, or drop those rows."
                )
        return errors

    @staticmethod
    def _answer_problem(context: str, answer: Any, v2: bool) -> str | None:
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            return f"answers={answer!r} is not {{'text': [...], 'answer_start': [...]}}"
        texts, starts = list(answer["text"]), list(answer["answer_start"])
        if len(texts) != len(starts):
            return f"{len(texts)} texts but {len(starts)} answer_start values"
        if not texts and not v2:
            return "no answer (set task.options.version_2_with_negative=true for unanswerable questions)"
        for text, start in zip(texts, starts, strict=True):
            if context[start : start + len(text)] != text:
                found = context[start : start + len(text)]
                return f"answer {text!r} at answer_start={start} reads {found!r} in the context"
        return None

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        question_col, context_col, answers_col = self.column("question"), self.column("context"), self.column("answers")
        kept = self.kept_raw_columns()
        max_length, stride = self.spec.max_seq_length, self.options.doc_stride
        pad_on_right = getattr(tokenizer, "padding_side", "right") == "right"

        def windows(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            # leading spaces of SQuAD questions would only eat window room
            questions = [q.lstrip() for q in batch[question_col]]
            first, second = (questions, batch[context_col]) if pad_on_right else (batch[context_col], questions)
            encoded = tokenizer(
                first, second, truncation="only_second" if pad_on_right else "only_first", max_length=max_length,
                stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
            )
            sample_of = encoded.pop("overflow_to_sample_mapping")
            context_side = 1 if pad_on_right else 0
            offsets_out, starts, ends = [], [], []
            for i, offsets in enumerate(encoded["offset_mapping"]):
                sequence_ids = encoded.sequence_ids(i)
                context_tokens = [k for k, s in enumerate(sequence_ids) if s == context_side]
                answer = batch[answers_col][sample_of[i]] if answers_col in batch else None
                start, end = self._token_span(offsets, context_tokens, answer)
                starts.append(start)
                ends.append(end)
                # only context tokens keep offsets: post-processing never picks the question or specials
                offsets_out.append([list(o) if s == context_side else None for o, s in zip(offsets, sequence_ids,
                                                                                           strict=True)])
            encoded["offset_mapping"] = offsets_out
            if answers_col in batch:
                encoded["start_positions"], encoded["end_positions"] = starts, ends
            encoded["example_id"] = [indices[s] for s in sample_of]
            for column in kept:  # one row per window: the raw columns repeat on each
                if column in batch:
                    encoded[column] = [batch[column][s] for s in sample_of]
            return dict(encoded)

        return windows

    @staticmethod
    def _token_span(offsets: list, context_tokens: list[int], answer: Any) -> tuple[int, int]:
        """Token indices of the first gold answer inside this window; (0, 0) ([CLS]) when it is not inside."""
        if not answer or not answer["answer_start"] or not context_tokens:
            return 0, 0
        start_char = answer["answer_start"][0]
        end_char = start_char + len(answer["text"][0])
        first, last = context_tokens[0], context_tokens[-1]
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            return 0, 0  # the answer is cut by (or lies outside) this window
        start = first
        while start <= last and offsets[start][0] <= start_char:
            start += 1
        end = last
        while end >= first and offsets[end][1] >= end_char:
            end -= 1
        return start - 1, end + 1

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForQuestionAnswering

        # the QA head is one linear layer with 2 outputs (start, end): whatever task.num_labels says
        spec = dataclasses.replace(self.spec, num_labels=2, label_names=[])
        return _common.build_model(AutoModelForQuestionAnswering, model_spec, spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        import torch

        targets, inputs = self.target_names, self.model_input_names

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            rows = [{k: f[k] for k in inputs if k in f} for f in features]
            if tokenizer is not None:
                batch = dict(tokenizer.pad(rows, return_tensors="pt"))
            else:
                width = max(len(r["input_ids"]) for r in rows)
                batch = {k: torch.tensor([list(r[k]) + [0] * (width - len(r[k])) for r in rows]) for k in rows[0]}
            for name in targets:
                if name in features[0]:
                    batch[name] = torch.tensor([f[name] for f in features], dtype=torch.long)
            return batch

        return collate

    # --- training ------------------------------------------------------------------------------
    def loss(self, outputs: Any, targets: dict[str, Any]) -> Any:
        """Mean of the start and end cross-entropies, per feature [B] (transformers' QA loss, unreduced)."""
        import torch.nn.functional as F

        def one(logits: Any, positions: Any) -> Any:
            # a position past the (padded) sequence can't be predicted: clamp it, as transformers does
            positions = positions.clamp(0, logits.shape[1] - 1)
            if self.loss_hook is not None:
                return self.loss_hook(logits, positions)
            return F.cross_entropy(logits.float(), positions, reduction="none", label_smoothing=self.label_smoothing)

        return (one(outputs.start_logits, targets["start_positions"]) + one(outputs.end_logits, targets["end_positions"])) / 2

    def count_items(self, targets: dict[str, Any]) -> Any:
        import torch

        positions = targets["start_positions"]
        return torch.ones(positions.shape[0], dtype=torch.long, device=positions.device)

    # --- evaluation ----------------------------------------------------------------------------
    def eval_outputs(self, outputs: Any) -> dict[str, Any]:
        return {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits}

    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Features -> one record per example (ascending example_id): the best answer over all its windows.

        Order-free: features of one example may come in any order (evaluation sorts by length; ranks gather
        their shards), and a feature seen twice changes nothing.
        """
        starts_all = np.asarray(predictions["start_logits"], dtype=np.float64)
        ends_all = np.asarray(predictions["end_logits"], dtype=np.float64)
        example_ids = list(dataset["example_id"])
        offsets_all = dataset["offset_mapping"]
        contexts = dataset[self.column("context")]
        by_example: dict[int, list[int]] = {}
        for row, example in enumerate(example_ids):
            by_example.setdefault(int(example), []).append(row)
        records: dict[str, list] = {"example_id": [], "answer": [], "score": [], "start": [], "end": [],
                                    "null_score_diff": []}
        for example in sorted(by_example):
            rows = by_example[example]
            answer, score, start, end, diff = self._best_answer(
                [(starts_all[r], ends_all[r], offsets_all[r]) for r in rows], contexts[rows[0]])
            for key, value in zip(records, (example, answer, score, start, end, diff), strict=True):
                records[key].append(value)
        return {key: np.asarray(values, dtype=object if key == "answer" else None) for key, values in records.items()}

    def _best_answer(self, windows: list[tuple[np.ndarray, np.ndarray, list]], context: str):
        """(answer, score, start_char, end_char, null_score - best span score) over the windows of one example."""
        n_best, max_tokens = self.options.n_best_size, self.options.max_answer_length
        spans: dict[tuple[int, int], float] = {}  # character span -> best logit sum (windows overlap)
        null_score = None
        for start_logits, end_logits, offsets in windows:
            width = len(offsets)
            start_logits, end_logits = start_logits[:width], end_logits[:width]
            cls_score = float(start_logits[0] + end_logits[0])
            # the smallest null score of the windows, as transformers' postprocess_qa_predictions does
            null_score = cls_score if null_score is None else min(null_score, cls_score)
            # stable descending order: ties go to the earlier token
            top_starts = np.argsort(-start_logits, kind="stable")[:n_best]
            top_ends = np.argsort(-end_logits, kind="stable")[:n_best]
            for s in top_starts:
                if offsets[s] is None:
                    continue
                for e in top_ends:
                    if offsets[e] is None or e < s or e - s + 1 > max_tokens:
                        continue
                    span = (int(offsets[s][0]), int(offsets[e][1]))
                    value = float(start_logits[s] + end_logits[e])
                    if value > spans.get(span, -np.inf):
                        spans[span] = value
        candidates = sorted(spans.items(), key=lambda kv: (-kv[1], kv[0]))
        v2 = self.options.version_2_with_negative
        scores = [v for _, v in candidates] + ([null_score] if v2 else [])
        if not scores:
            return "", 1.0, -1, -1, float("inf")
        probs = np.exp(np.asarray(scores) - max(scores))
        probs /= probs.sum()
        if not candidates:
            return "", float(probs[-1]), -1, -1, float("inf")
        (best_start, best_end), best = candidates[0]
        diff = float(null_score - best)
        if v2 and diff > self.options.null_score_diff_threshold:
            return "", float(probs[-1]), -1, -1, diff
        return context[best_start:best_end], float(probs[0]), best_start, best_end, diff

    def _gold(self, dataset: Any, example_ids: np.ndarray) -> list[list[str]]:
        answers = dataset[self.column("answers")]
        first_row: dict[int, int] = {}
        for row, example in enumerate(dataset["example_id"]):
            first_row.setdefault(int(example), row)
        return [list(answers[first_row[int(e)]]["text"]) for e in example_ids]

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        """SQuAD EM / F1 (trainer_core/metrics/squad.py) of one answer per example; v2 adds HasAns_* / NoAns_*."""
        from trainer_core.metrics.squad import squad_scores

        records = self.postprocess(predictions, dataset)
        scores = squad_scores(list(records["answer"]), self._gold(dataset, records["example_id"]))
        wanted = set(self.spec.metrics)
        if self.options.version_2_with_negative:
            wanted |= {f"{group}_{m}" for group in ("HasAns", "NoAns") for m in ("exact", "f1")}
        return {k: float(v) for k, v in scores.items() if k in wanted}

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        records = self.postprocess(predictions, dataset)
        question, id_col = self.column("question"), self.column("id")
        first_row: dict[int, int] = {}
        for row, example in enumerate(dataset["example_id"]):
            first_row.setdefault(int(example), row)
        gold = self._gold(dataset, records["example_id"]) if scored else None
        for i, example in enumerate(records["example_id"].tolist()):
            source = dataset[first_row[example]]
            row = {"row_id": example}
            if id_col and id_col in source:
                row["id"] = source[id_col]
            row.update(question=source[question], answer=records["answer"][i],
                       score=round(float(records["score"][i]), 6), start=int(records["start"][i]),
                       end=int(records["end"][i]))
            if gold is not None:
                row["true_answers"] = gold[i]
            yield row

    # --- serving -------------------------------------------------------------------------------
    def serving_schema(self) -> dict[str, list]:
        return {"inputs": [["string", c] for c in self.input_columns()],
                "outputs": [["string", "answer"], ["double", "score"], ["long", "start"], ["long", "end"]],
                "params": []}

    def input_example(self, raw_split: Any) -> Any:
        import pandas as pd

        rows, seen = [], set()
        for i, example in enumerate(raw_split["example_id"] if "example_id" in raw_split.column_names
                                    else range(len(raw_split))):
            if example not in seen:
                seen.add(example)
                rows.append(i)
            if len(rows) == 2:
                break
        picked = raw_split.select(rows)
        return pd.DataFrame({c: picked[c] for c in self.input_columns()})

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        return AutoModelForQuestionAnswering.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import datasets
        import pandas as pd
        import torch

        batch_size = int((params or {}).get("batch_size", 32))
        columns = self.input_columns()
        raw = {c: frame[c].astype(str).tolist() for c in columns}
        features = datasets.Dataset.from_dict(self.preprocess(processor)(raw, list(range(len(frame)))))
        collate = self.collator(processor, model)
        starts, ends = [], []
        with torch.inference_mode():
            for first in range(0, len(features), batch_size):
                chunk = features.select(range(first, min(first + batch_size, len(features))))
                inputs, _ = self.split_batch(collate([chunk[i] for i in range(len(chunk))]))
                out = model(**inputs)
                starts += list(out.start_logits.float().numpy())
                ends += list(out.end_logits.float().numpy())
        width = max(len(s) for s in starts)
        pad = lambda rows: np.stack([np.pad(r, (0, width - len(r)), constant_values=-1e4) for r in rows])  # noqa: E731
        records = self.postprocess({"start_logits": pad(starts), "end_logits": pad(ends)}, features)
        return pd.DataFrame({"answer": list(records["answer"]), "score": records["score"].astype(float),
                             "start": records["start"].astype("int64"), "end": records["end"].astype("int64")})
