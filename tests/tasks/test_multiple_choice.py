"""multiple_choice on SWAG's schema: choices flattened to [B, C, L] and back, accuracy, bad input, serving."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from tests.tasks.factories import TINY_BERT, family_cases, tokenizer_for
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks import get_task

CASE = family_cases()["multiple_choice"]


@pytest.fixture(scope="module")
def fam():
    return get_task("multiple_choice")(CASE.spec)


@pytest.fixture(scope="module")
def tokenizer(fam):
    return tokenizer_for(fam, CASE.raw)


def test_each_choice_is_the_pair_context_and_header_plus_ending(fam, tokenizer):
    out = fam.preprocess(tokenizer)({k: v[:2] for k, v in CASE.raw.items()}, [0, 1])
    assert out["example_id"] == [0, 1] and out["labels"] == [0, 1]
    assert [len(choices) for choices in out["input_ids"]] == [4, 4]
    decoded = tokenizer.decode(out["input_ids"][1][1])
    assert decoded == "[CLS] he picks up the ball. [SEP] he throws it to his friend. [SEP]"
    # the second segment (header + ending) is token type 1
    types, ids = out["token_type_ids"][1][1], out["input_ids"][1][1]
    assert types[: ids.index(tokenizer.sep_token_id) + 1] == [0] * (ids.index(tokenizer.sep_token_id) + 1)
    assert types[-1] == 1


def test_collator_pads_every_choice_to_one_batch_shape(fam, tokenizer):
    features = fam.preprocess(tokenizer)(dict(CASE.raw), [0, 1, 2])
    rows = [{k: features[k][i] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")} for i in range(3)]
    longest = max(len(choice) for ids in features["input_ids"] for choice in ids)
    batch = fam.collator(tokenizer)(rows)
    assert batch["input_ids"].shape == (3, 4, longest) and batch["labels"].tolist() == [0, 1, 0]
    # unpadded tokens are exactly each choice's own tokens
    for b in range(3):
        for c in range(4):
            length = len(features["input_ids"][b][c])
            assert batch["input_ids"][b, c, :length].tolist() == features["input_ids"][b][c]
            assert batch["attention_mask"][b, c].sum() == length
    assert fam.lengths(datasets.Dataset.from_dict(features)) == [max(map(len, ids)) for ids in features["input_ids"]]


def test_model_scores_choices_and_loss_is_cross_entropy_per_example(fam, tokenizer):
    torch.manual_seed(0)
    model = fam.build_model(ModelSpec(config={**TINY_BERT, "vocab_size": len(tokenizer)}, dropout=0.0)).eval()
    assert type(model).__name__ == "BertForMultipleChoice"
    features = fam.preprocess(tokenizer)(dict(CASE.raw), [0, 1, 2])
    rows = [{k: features[k][i] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")} for i in range(3)]
    inputs, targets = fam.split_batch(fam.collator(tokenizer)(rows))
    with torch.no_grad():
        step = fam.eval_step(model, inputs, targets)
    assert step.outputs["logits"].shape == (3, 4)
    # hand-computed: logits [2, 0, 0, 0] with label 0 -> -log(e^2 / (e^2 + 3))
    loss = fam.loss_per_example(torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0.0]]), torch.tensor([0, 3]))
    assert loss.tolist() == pytest.approx([-math.log(math.e**2 / (math.e**2 + 3)), math.log(4)])


def test_accuracy_and_prediction_rows(fam, tokenizer):
    logits = np.array([[3.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 0.5]])  # picks 0, 2, 3; labels 0, 1, 0
    assert fam.compute_metrics({"logits": logits}, {"labels": np.array([0, 1, 0])}) == {"accuracy": pytest.approx(1 / 3)}
    features = datasets.Dataset.from_dict({**fam.preprocess(tokenizer)(dict(CASE.raw), [0, 1, 2]),
                                           **{c: CASE.raw[c] for c in fam.kept_raw_columns()}})
    rows = list(fam.prediction_rows({"logits": logits}, features, scored=True))
    assert [(r["row_id"], r["label"], r["true_label"]) for r in rows] == [(0, 0, 0), (1, 2, 1), (2, 3, 0)]
    # softmax of [3, 0, 0, 0]: e^3 / (e^3 + 3)
    assert rows[0]["score"] == pytest.approx(math.e**3 / (math.e**3 + 3), abs=1e-6)
    assert rows[0]["scores"][1] == pytest.approx(1 / (math.e**3 + 3), abs=1e-6) and rows[0]["sent1"] == "she opens the door ."


def _raw(**changes):
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({**CASE.raw, **changes})})


def test_a_row_with_fewer_choices_is_refused_naming_row_and_column(fam):
    assert fam.check_raw(_raw(), ("train",)) == []
    errors = fam.check_raw(_raw(ending2=["a", "b", ""]), ("train",))
    assert len(errors) == 1 and "train split row 2 has 3 choices" in errors[0] and "'ending2'" in errors[0]
    assert "task.columns.endings" in errors[0]
    # one column holding the choices: rows with another number of them
    spec = TaskSpec(family="multiple_choice", columns={"context": "sent1", "endings": "choices", "label": "label"})
    listed = get_task("multiple_choice")(spec)
    raw = _raw(choices=[["a", "b", "c"], ["a", "b", "c"], ["a", "b"]])
    assert "train split row 2 has 2 choices" in listed.check_raw(raw, ("train",))[0]
    assert listed.check_raw(_raw(choices=[["a", "b", "c"]] * 3), ("train",)) == []


def test_labels_that_index_no_choice_are_refused(fam):
    errors = fam.check_raw(_raw(label=[0, 4, 1]), ("train",))
    assert len(errors) == 1 and "row 1 has label 4" in errors[0] and "task.label_column='label'" in errors[0]
    assert fam.check_raw(_raw(label=[0, -1, 1]), ()) == []  # an unscored split (SWAG test: -1)


def test_config_errors_name_the_keys():
    cls = get_task("multiple_choice")
    spec = TaskSpec(family="multiple_choice", columns={"label": "label", "endings": ["ending0"]}, metrics=["f1"])
    errors = cls.config_errors(spec)
    assert any(e.startswith("task.columns.context:") for e in errors)
    assert any(e.startswith("task.columns.endings=['ending0']:") for e in errors)
    assert any(e.startswith("task.metrics:") for e in errors)


def test_serve_picks_a_choice_with_scores_that_sum_to_one(fam, tokenizer):
    torch.manual_seed(0)
    model = fam.build_model(ModelSpec(config={**TINY_BERT, "vocab_size": len(tokenizer)}, dropout=0.0)).eval()
    frame = pd.DataFrame({c: CASE.raw[c] for c in fam.input_columns()})
    out = fam.serve(model, tokenizer, frame, {"batch_size": 2})
    assert list(out.columns) == ["index", "score", "score_0", "score_1", "score_2", "score_3"] and len(out) == 3
    scores = out[["score_0", "score_1", "score_2", "score_3"]].to_numpy()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert out["index"].tolist() == scores.argmax(axis=1).tolist()
    assert out["score"].tolist() == pytest.approx(scores.max(axis=1).tolist())
    # the same scores as one batched forward pass of the collated features
    features = fam.preprocess(tokenizer)({c: CASE.raw[c] for c in fam.input_columns()}, [0, 1, 2])
    rows = [{k: features[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")} for i in range(3)]
    with torch.no_grad():
        probs = model(**fam.collator(tokenizer)(rows)).logits.softmax(-1).numpy()
    np.testing.assert_allclose(scores, probs, rtol=1e-4, atol=1e-6)
