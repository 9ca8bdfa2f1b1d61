"""trainer_core.metrics.generation against hand-computed ROUGE and sacrebleu's own documented example."""

from __future__ import annotations

import pytest

from trainer_core.metrics.generation import bleu, chrf, generation_metrics, rouge, sentences_per_line


def test_rouge_l_is_the_longest_common_subsequence():
    # prediction "mat on the cat" vs reference "the cat on mat": every unigram matches (ROUGE-1 = 100), the
    # longest common subsequence is "the cat" (2 of 4 tokens each side): P = R = F = 2/4; one shared bigram of 3
    scores = rouge(["mat on the cat"], ["the cat on mat"], use_stemmer=False)
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rouge2"] == pytest.approx(100.0 / 3)


def test_rouge_l_f_measure_of_unequal_lengths():
    # "the cat sat on the mat" (6 tokens) vs "the cat is on mat" (5): LCS "the cat on mat" = 4
    # P = 4/6, R = 4/5, F = 2PR / (P + R) = 16/22
    assert rouge(["the cat sat on the mat"], ["the cat is on mat"], ["rougeL"], use_stemmer=False)["rougeL"] == \
        pytest.approx(100.0 * 16 / 22)


def test_rouge_lsum_matches_sentences_in_any_order():
    # the same two sentences, swapped: over the whole text the LCS is one sentence (3 of 6 tokens) -> rougeL 50;
    # summary-level LCS matches each reference line with its own sentence -> rougeLsum 100
    scores = rouge(["the dog ran. the cat sat."], ["the cat sat.\nthe dog ran."], use_stemmer=False)
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_rouge_is_the_mean_over_examples():
    scores = rouge(["a b", "c d"], ["a b", "x y"], ["rouge1"], use_stemmer=False)
    assert scores["rouge1"] == pytest.approx(50.0)


def test_sentences_per_line_keeps_existing_lines():
    assert sentences_per_line("One. Two! Three?") == "One.\nTwo!\nThree?"
    assert sentences_per_line("Council approves park.\nWork starts in May.") == \
        "Council approves park.\nWork starts in May."


# sacrebleu's README, "Using SacreBLEU from Python": BLEU = 48.53, chrF2 = 59.73 for these two reference sets
SYSTEM = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFERENCE_SETS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
                  ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
PER_EXAMPLE = [list(refs) for refs in zip(*REFERENCE_SETS, strict=True)]  # our layout: the references of each example


def test_bleu_and_chrf_match_sacrebleus_documented_example():
    assert bleu(SYSTEM, PER_EXAMPLE) == pytest.approx(48.53, abs=0.005)
    assert chrf(SYSTEM, PER_EXAMPLE) == pytest.approx(59.73, abs=0.005)


def test_bleu_of_identical_text_is_100_and_of_disjoint_text_0():
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    assert bleu(["a b c d e"], ["v w x y z"]) == pytest.approx(0.0)


def test_generation_metrics_names_and_errors():
    out = generation_metrics(["rouge1", "rougeLsum", "bleu", "chrf"], ["the cat sat on it"],
                             ["the cat sat on it"])
    assert set(out) == {"rouge1", "rougeLsum", "bleu", "chrf"}
    assert out["rouge1"] == pytest.approx(100.0) and out["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="meteor"):
        generation_metrics(["meteor"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
