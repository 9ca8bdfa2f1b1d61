"""SQuAD exact match and F1 as plain functions (no `evaluate` module: nothing to fetch).

    from trainer_core.metrics.squad import squad_scores
    squad_scores(["the Eiffel Tower", ""], [["Eiffel Tower"], []])
    # {'exact_match': 1.0, 'f1': 1.0, 'HasAns_exact': 1.0, 'HasAns_f1': 1.0, 'NoAns_exact': 1.0, 'NoAns_f1': 1.0}

The definitions are those of the official SQuAD v2.0 evaluation script (evaluate-v2.0.py, Rajpurkar et al.,
https://rajpurkar.github.io/SQuAD-explorer/): `normalize_answer` lowercases, removes punctuation, the articles
a / an / the and extra whitespace; EM and F1 take the best score over the gold answers; an unanswerable question
has the gold answer "" (the script's `gold_answers = ['']`), and F1 with an empty side is 1 only when both are
empty. For answerable questions this equals the v1.1 script. Scores are fractions in 0..1 (the official script
prints 100 times these), like every other metric of this project.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official script's order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (bag of tokens, counted with multiplicity)."""
    predicted, expected = _tokens(prediction), _tokens(gold)
    if not predicted or not expected:
        # an unanswerable question: right only if both say "no answer"
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: list[str]) -> list[str]:
    """The gold texts that count: those not empty after normalisation; [""] for an unanswerable question."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """exact_match and f1 over all questions (mean of the best score over each question's gold answers), and
    the v2 breakdown HasAns_* / NoAns_* over the answerable / unanswerable ones (a group only when present)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    groups: dict[str, list[tuple[float, float]]] = {"HasAns": [], "NoAns": []}
    for prediction, answers in zip(predictions, references, strict=True):
        golds = gold_answers(list(answers))
        em = max(exact_match(prediction, g) for g in golds)
        f = max(f1(prediction, g) for g in golds)
        groups["HasAns" if golds != [""] else "NoAns"].append((em, f))
    every = groups["HasAns"] + groups["NoAns"]
    if not every:
        return {"exact_match": 0.0, "f1": 0.0}
    results = {"exact_match": sum(e for e, _ in every) / len(every), "f1": sum(f for _, f in every) / len(every)}
    for name, scores in groups.items():
        if scores:
            results[f"{name}_exact"] = sum(e for e, _ in scores) / len(scores)
            results[f"{name}_f1"] = sum(f for _, f in scores) / len(scores)
    return results
