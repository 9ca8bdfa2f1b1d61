"""Token classification: entity-level seqeval metrics on B-/I- boundary cases, IOBES, token-level POS metrics,
one tag per word read back from the first sub-token, and bad raw data named by row."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from tests.tasks.factories import family_cases, tokenizer_for
from trainer_core.spec import TaskSpec
from trainer_core.tasks import get_task

NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _family(names, scheme="auto", metrics=("accuracy", "precision", "recall", "f1")):
    spec = TaskSpec(family="token_classification", columns={"tokens": "tokens", "label": "tags"},
                    num_labels=len(names), label_names=list(names), metrics=list(metrics),
                    options={"label_scheme": scheme})
    return get_task("token_classification")(spec)


def _metrics(family, true_rows, pred_rows):
    names = family.tag_names()
    width = max(len(r) for r in true_rows) + 1
    labels = np.full((len(true_rows), width), -100)
    preds = np.zeros((len(true_rows), width), dtype=int)
    for i, (t, p) in enumerate(zip(true_rows, pred_rows, strict=True)):
        labels[i, 1 : len(t) + 1] = [names.index(x) for x in t]  # position 0 is [CLS]: -100
        preds[i, 1 : len(p) + 1] = [names.index(x) for x in p]
    return family.compute_metrics({"logits": preds}, {"labels": labels})


def test_entity_boundary_cut_short_counts_as_a_miss():
    # true: PER(0-1), LOC(3-4); predicted: PER(0-1), LOC(3-3): one of two entities right on each side
    got = _metrics(_family(NER), [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]], [["B-PER", "I-PER", "O", "B-LOC", "O"]])
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(0.5)
    assert got["accuracy"] == pytest.approx(4 / 5)


def test_an_entity_starting_with_i_is_not_an_entity_in_strict_iob2():
    got = _metrics(_family(NER), [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])
    assert (got["precision"], got["recall"], got["f1"]) == (0.0, 0.0, 0.0)
    assert got["accuracy"] == pytest.approx(2 / 3)


def test_iobes_needs_an_end_tag():
    names = ["O", "S-LOC", "B-PER", "I-PER", "E-PER"]
    # predicted PER is B-I without E: invalid under IOBES; only the LOC is found: P = 1/1, R = 1/2
    got = _metrics(_family(names), [["S-LOC", "B-PER", "E-PER"]], [["S-LOC", "B-PER", "I-PER"]])
    assert got["precision"] == pytest.approx(1.0) and got["recall"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(2 / 3)


def test_pos_tags_get_token_level_macro_scores():
    family = _family(["DT", "NN", "VB"])
    assert family.scheme() == "none"
    got = _metrics(family, [["DT", "NN", "VB", "NN"]], [["DT", "NN", "NN", "NN"]])
    # per tag: DT P=R=1; NN P=2/3 R=1; VB P=0 (no prediction) R=0 -> macro P=(1+2/3+0)/3, R=(1+1+0)/3
    assert got["precision"] == pytest.approx((1 + 2 / 3) / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(3 / 4)


def test_prediction_rows_read_one_tag_per_word_and_group_entities():
    case = family_cases()["token_classification"]
    family = get_task("token_classification")(case.spec)
    tokenizer = tokenizer_for(family, case.raw)
    raw = datasets.Dataset.from_dict({"tokens": [["Parisada", "is", "Bob"]], "ner_tags": [[3, 0, 1]]})
    features = raw.map(family.preprocess(tokenizer), batched=True, with_indices=True, remove_columns=["ner_tags"])
    word_ids = features[0]["word_ids"]
    assert word_ids.count(0) > 1  # the first word is split into several sub-tokens
    # predict the true tag on every sub-token of a word but a wrong one on its later sub-tokens: only the
    # first sub-token's prediction may count
    scores = np.zeros((1, len(word_ids), 5))
    tags = [3, 0, 1]
    seen = set()
    for position, word in enumerate(word_ids):
        if word >= 0:
            scores[0, position, tags[word] if word not in seen else 2] = 5.0
            seen.add(word)
    rows = list(family.prediction_rows({"logits": scores}, features, scored=True))
    assert rows[0]["tags"] == ["B-LOC", "O", "B-PER"]
    assert rows[0]["true_tags"] == ["B-LOC", "O", "B-PER"]
    assert [(e["type"], e["text"]) for e in rows[0]["entities"]] == [("LOC", "Parisada"), ("PER", "Bob")]


def test_bad_raw_rows_are_named():
    family = _family(NER)
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"tokens": [["a", "b"], ["c"]],
                                                                     "tags": [[0, 0], [9]]})})
    errors = family.check_raw(raw, ("train",))
    assert any("row 1 of the train split" in e and "[9]" in e for e in errors), errors
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"tokens": [["a", "b"]], "tags": [[0]]})})
    assert any("row 0" in e and "2 words but 1 tags" in e for e in family.check_raw(raw, ("train",)))
