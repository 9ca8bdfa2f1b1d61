"""Metrics of generated text, offline: ROUGE (rouge-score) for summaries, BLEU and chrF (sacrebleu) for translations.

    from trainer_core.metrics.generation import rouge, bleu, chrf, generation_metrics
    rouge(["the cat sat"], ["the cat sat down"])            # {"rouge1": ..., "rouge2": ..., "rougeL": ..., "rougeLsum": ...}
    generation_metrics(["rouge1", "bleu"], predictions, references)

Plain functions, not `evaluate` modules: `evaluate.load("rouge")` fetches its script from the Hub. Every score is on
a 0-100 scale (sacrebleu's, and what transformers' run_summarization reports for ROUGE: the mean F-measure x 100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SACREBLEU_METRICS = ("bleu", "chrf")
TEXT_METRICS = (*ROUGE_METRICS, *SACREBLEU_METRICS)
"""Metrics computed from decoded texts (gen_len is counted on token ids by the seq2seq family)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_per_line(text: str) -> str:
    """One sentence per line, as rougeLsum expects: kept as is when the text has newlines already (cnn_dailymail's
    highlights), else split after . ! or ? followed by a space (nltk's punkt needs a download; this does not)."""
    text = text.strip()
    if "\n" in text:
        return text
    return "\n".join(s for s in _SENTENCE_END.split(text) if s)


def rouge(predictions: Sequence[str], references: Sequence[str], names: Sequence[str] = ROUGE_METRICS,
          use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE F-measure x 100 over the examples, for each of `names` (rouge1, rouge2, rougeL, rougeLsum).

    rougeL is the LCS over the whole text; rougeLsum the summary-level LCS over sentences, one per line.
    """
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=use_stemmer)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        if "rougeLsum" in names:  # the scorer splits on newlines for Lsum only; the other scores ignore them
            prediction, reference = sentences_per_line(prediction), sentences_per_line(reference)
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    count = max(len(predictions), 1)
    return {name: 100.0 * total / count for name, total in totals.items()}


def _references_streams(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one list per reference *set*: [[ref1 of each example], [ref2 of each], ...]."""
    if references and not isinstance(references[0], str):
        return [list(stream) for stream in zip(*references, strict=True)]
    return [list(references)]


def bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exp smoothing); references: one string per example or a
    list of references per example."""
    from sacrebleu.metrics import BLEU

    _check_lengths(predictions, references)
    return float(BLEU().corpus_score(list(predictions), _references_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (character 6-grams, beta 2; sacrebleu defaults)."""
    from sacrebleu.metrics import CHRF

    _check_lengths(predictions, references)
    return float(CHRF().corpus_score(list(predictions), _references_streams(references)).score)


def generation_metrics(names: Sequence[str], predictions: Sequence[str],
                       references: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """The named text metrics (any of TEXT_METRICS) of predictions against references."""
    unknown = [n for n in names if n not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"unknown generation metric(s) {', '.join(unknown)}: use any of {', '.join(TEXT_METRICS)}.")
    results: dict[str, float] = {}
    wanted_rouge = [n for n in names if n in ROUGE_METRICS]
    if wanted_rouge:
        single = [r if isinstance(r, str) else r[0] for r in references]  # ROUGE: the first reference
        results.update(rouge(predictions, single, wanted_rouge))
    if "bleu" in names:
        results["bleu"] = bleu(predictions, references)
    if "chrf" in names:
        results["chrf"] = chrf(predictions, references)
    return results


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: give one per example.")
