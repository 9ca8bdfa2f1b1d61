"""question_answering: windows of long contexts, post-processing back to one answer per example, SQuAD EM/F1.

Expected values are worked out by hand (metrics) or from the tokenizer's own offsets (spans): never copied from
a run of the code under test.
"""

from __future__ import annotations

import dataclasses
import random

import datasets
import numpy as np
import pytest
import torch

from stages.tokenizers import train_wordpiece
from tests.tasks.factories import TINY_BERT
from trainer_core.metrics.squad import exact_match, f1, normalize_answer, squad_scores
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks import get_task

COLUMNS = {"id": "id", "question": "question", "context": "context", "answers": "answers"}
# 30 filler words, then the answer: with 24 tokens a window, the answer can't be in the first one
LONG = " ".join(f"word{i}" for i in range(30)) + " the tower stands in paris today ."
QUESTION = "where is the tower"


def family(**options):
    spec = TaskSpec(family="question_answering", columns=dict(COLUMNS), metrics=["exact_match", "f1"],
                    max_seq_length=24, options={"doc_stride": 8, **options})
    return get_task("question_answering")(spec)


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece([LONG, QUESTION, "bob plays the piano .", "who plays", "alice lives in london ."], 300)


def answer(text, context):
    return {"text": [text], "answer_start": [context.index(text)]} if text else {"text": [], "answer_start": []}


def features_of(fam, tokenizer, rows):
    raw = {"id": [f"q{i}" for i in range(len(rows))], "question": [q for q, _, _ in rows],
           "context": [c for _, c, _ in rows], "answers": [answer(a, c) for _, c, a in rows]}
    return datasets.Dataset.from_dict(fam.preprocess(tokenizer)(raw, list(range(len(rows)))))


def token_at(offsets, char):
    """The token of a window whose span starts (or ends) at character `char`."""
    return next(k for k, o in enumerate(offsets) if o is not None and char in (o[0], o[1]))


def logits_for(features, picks, cls=0.0):
    """Start / end logits with 0 everywhere, `cls` on [CLS] and the given (row, start, end, value) picks."""
    width = max(len(ids) for ids in features["input_ids"])
    starts, ends = np.zeros((len(features), width)), np.zeros((len(features), width))
    starts[:, 0] = ends[:, 0] = cls
    for row, s, e, value in picks:
        starts[row, s] += value
        ends[row, e] += value
    return {"start_logits": starts, "end_logits": ends}


# --- SQuAD metrics ---------------------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("Anna theatre") == "anna theatre"  # articles only as whole words
    assert exact_match("The U.S.", "us") == 1.0
    assert exact_match("the cat", "cats") == 0.0


def test_f1_counts_token_overlap_after_normalisation():
    # pred {cat, sat, on, mat}, gold {cat, on, mat}: P = 3/4, R = 1, F1 = 2 * 3/4 / (7/4) = 6/7
    assert f1("a cat sat on the mat", "the cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count once per occurrence: pred {paris, paris}, gold {paris}: P = 1/2, R = 1 -> 2/3
    assert f1("Paris, Paris", "paris") == pytest.approx(2 / 3)
    assert f1("london", "paris") == 0.0
    assert f1("", "") == 1.0 and f1("the", "") == 1.0  # "the" normalises to nothing: both empty
    assert f1("paris", "") == 0.0


def test_squad_scores_take_the_best_gold_answer_and_split_has_and_no_answer():
    scores = squad_scores(
        ["in Paris", "the cat", "", "some text"],
        [["Paris", "In  Paris."], ["a dog"], [], []],
    )
    # EM: 1 (the second gold normalises to "in paris"), 0, 1 (empty for no answer), 0 -> 2/4
    # F1: 1, 0 ("cat" vs "dog"), 1, 0 -> 2/4
    assert scores["exact_match"] == pytest.approx(0.5) and scores["f1"] == pytest.approx(0.5)
    assert scores["HasAns_exact"] == pytest.approx(0.5) and scores["NoAns_exact"] == pytest.approx(0.5)
    # partial credit on the second gold: "paris france" vs pred "paris": P = 1, R = 1/2 -> 2/3
    assert squad_scores(["Paris"], [["Paris, France"]])["f1"] == pytest.approx(2 / 3)
    assert "NoAns_f1" not in squad_scores(["x"], [["x"]])


# --- preprocessing ----------------------------------------------------------------------------


def test_long_context_is_cut_into_overlapping_windows_with_the_answer_span(tokenizer):
    fam = family()
    features = features_of(fam, tokenizer, [(QUESTION, LONG, "paris")])
    assert len(features) > 1 and set(features["example_id"]) == {0}
    start_char = LONG.index("paris")
    holding = [i for i, o in enumerate(features["offset_mapping"])
               if any(x is not None and x[0] == start_char for x in o)]
    assert holding and holding[0] > 0, "the answer must lie beyond the first window"
    for i in range(len(features)):
        offsets, s, e = features["offset_mapping"][i], features["start_positions"][i], features["end_positions"][i]
        ids = features["input_ids"][i]
        assert offsets[0] is None and offsets[ids.index(tokenizer.sep_token_id)] is None  # [CLS], question, [SEP]
        if i in holding:
            assert (offsets[s][0], offsets[e][1]) == (start_char, start_char + len("paris"))
        else:
            assert (s, e) == (0, 0)
    # consecutive windows share doc_stride=8 context tokens
    first = [o for o in features["offset_mapping"][0] if o is not None]
    second = [o for o in features["offset_mapping"][1] if o is not None]
    assert first[-8:] == second[:8]
    # the raw columns ride along on every window
    assert features["context"] == [LONG] * len(features) and features["id"] == ["q0"] * len(features)


# --- post-processing --------------------------------------------------------------------------


def test_best_span_over_all_windows_when_the_answer_is_in_the_second_window(tokenizer):
    fam = family()
    features = features_of(fam, tokenizer, [(QUESTION, LONG, "paris")])
    start_char = LONG.index("paris")
    second = next(i for i, o in enumerate(features["offset_mapping"]) if any(x and x[0] == start_char for x in o))
    assert second >= 1
    offsets = features["offset_mapping"][second]
    k = token_at(offsets, start_char)
    decoy = token_at(features["offset_mapping"][0], 0)  # "word0" in the first window, a weaker span (3 + 3)
    records = fam.postprocess(logits_for(features, [(second, k, k, 5.0), (0, decoy, decoy, 3.0)]), features)
    assert records["answer"].tolist() == ["paris"]
    assert (records["start"][0], records["end"][0]) == (start_char, start_char + 5)
    # the score is the softmax over the distinct candidate spans: paris (10) has the largest share
    assert 0.5 < records["score"][0] <= 1.0


def test_unanswerable_v2_question_gets_the_null_answer(tokenizer):
    context = "bob plays the piano ."
    fam = family(version_2_with_negative=True)
    features = features_of(fam, tokenizer, [("who plays", context, None)])
    assert (features["start_positions"], features["end_positions"]) == ([0], [0])  # target: [CLS]
    k = token_at(features["offset_mapping"][0], context.index("bob"))
    # null score 5 + 5 = 10 beats the best span 2 + 2 = 4 by 6 > threshold 0
    predictions = logits_for(features, [(0, k, k, 2.0)], cls=5.0)
    records = fam.postprocess(predictions, features)
    assert records["answer"].tolist() == [""] and (records["start"][0], records["end"][0]) == (-1, -1)
    assert records["null_score_diff"][0] == pytest.approx(6.0)
    # with a threshold above the difference, the span stands
    lenient = family(version_2_with_negative=True, null_score_diff_threshold=7.0)
    assert lenient.postprocess(predictions, features)["answer"].tolist() == ["bob"]
    # SQuAD v1 has no null answer: the span stands whatever the [CLS] score
    assert family().postprocess(predictions, features)["answer"].tolist() == ["bob"]


def test_null_score_is_the_smallest_over_the_windows(tokenizer):
    fam = family(version_2_with_negative=True)
    features = features_of(fam, tokenizer, [(QUESTION, LONG, "paris")])
    start_char = LONG.index("paris")
    second = next(i for i, o in enumerate(features["offset_mapping"]) if any(x and x[0] == start_char for x in o))
    k = token_at(features["offset_mapping"][second], start_char)
    predictions = logits_for(features, [(second, k, k, 2.0)], cls=5.0)  # span 4 < null 10 everywhere
    assert fam.postprocess(predictions, features)["answer"].tolist() == [""]
    predictions["start_logits"][second, 0] = predictions["end_logits"][second, 0] = 1.0  # one window's null: 2
    assert fam.postprocess(predictions, features)["answer"].tolist() == ["paris"]


def test_postprocess_ignores_feature_order_and_duplicates_as_ranks_would_gather_them(tokenizer):
    """Evaluation sorts features by length and ranks gather their shards: one example's windows arrive in any
    order, possibly apart; the answer per example must not change."""
    fam = family(version_2_with_negative=True)
    rows = [(QUESTION, LONG, "paris"), ("who plays", "bob plays the piano .", None),
            ("where does alice live", "alice lives in london .", "london")]
    features = features_of(fam, tokenizer, rows)
    rng = np.random.default_rng(0)
    width = max(len(ids) for ids in features["input_ids"])
    predictions = {"start_logits": rng.normal(size=(len(features), width)),
                   "end_logits": rng.normal(size=(len(features), width))}
    reference = fam.postprocess(predictions, features)
    assert reference["example_id"].tolist() == [0, 1, 2]
    order = list(range(len(features)))
    random.Random(1).shuffle(order)
    order += order[:2]  # two features seen twice
    shuffled = {k: v[order] for k, v in predictions.items()}
    again = fam.postprocess(shuffled, features.select(order))
    for key in ("example_id", "answer", "start", "end"):
        assert again[key].tolist() == reference[key].tolist(), key
    np.testing.assert_allclose(again["score"], reference["score"])


def test_compute_metrics_scores_one_answer_per_example_with_the_v2_breakdown(tokenizer):
    fam = family(version_2_with_negative=True)
    rows = [(QUESTION, LONG, "paris"), ("who plays", "bob plays the piano .", None)]
    features = features_of(fam, tokenizer, rows)
    start_char = LONG.index("paris")
    second = next(i for i, o in enumerate(features["offset_mapping"]) if any(x and x[0] == start_char for x in o))
    k = token_at(features["offset_mapping"][second], start_char)
    unanswerable = features["example_id"].index(1)
    j = token_at(features["offset_mapping"][unanswerable], 0)  # "bob"
    predictions = logits_for(features, [(second, k, k, 5.0), (unanswerable, j, j, 5.0)], cls=1.0)
    targets = {"start_positions": np.array(features["start_positions"])}
    metrics = fam.compute_metrics(predictions, targets, features)
    # paris right (1), "bob" for an unanswerable question wrong (0)
    assert metrics == {"exact_match": 0.5, "f1": 0.5, "HasAns_exact": 1.0, "HasAns_f1": 1.0,
                       "NoAns_exact": 0.0, "NoAns_f1": 0.0}
    rows_out = list(fam.prediction_rows(predictions, features, scored=True))
    assert [(r["row_id"], r["id"], r["answer"], r["true_answers"]) for r in rows_out] == [
        (0, "q0", "paris", ["paris"]), (1, "q1", "bob", [])]


# --- bad input, config, model, serving ----------------------------------------------------------


def test_an_answer_not_in_its_context_is_refused_naming_row_and_column():
    fam = family()
    good = {"id": ["a"], "question": ["q"], "context": ["alice lives in london ."],
            "answers": [{"text": ["london"], "answer_start": [15]}]}
    bad = {k: v * 3 for k, v in good.items()}
    bad["answers"] = [good["answers"][0], good["answers"][0], {"text": ["paris"], "answer_start": [15]}]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(good), "validation": datasets.Dataset.from_dict(good)})
    assert fam.check_raw(raw, ("train", "validation")) == []
    raw["validation"] = datasets.Dataset.from_dict(bad)
    errors = fam.check_raw(raw, ("train", "validation"))
    assert len(errors) == 1
    assert "task.columns.answers='answers'" in errors[0] and "validation split" in errors[0]
    assert "row 2" in errors[0] and "'paris'" in errors[0] and "'context'" in errors[0]
    # SQuAD v1 has no unanswerable questions
    empty = {**good, "answers": [{"text": [], "answer_start": []}]}
    raw["validation"] = datasets.Dataset.from_dict(empty)
    assert "version_2_with_negative" in family().check_raw(raw, ("validation",))[0]
    assert family(version_2_with_negative=True).check_raw(raw, ("validation",)) == []


def test_config_errors_name_the_keys():
    cls = get_task("question_answering")
    spec = TaskSpec(family="question_answering", columns={"context": "context", "answers": "answers"},
                    metrics=["exact_match"], max_seq_length=64, options={"doc_stride": 64, "n_best_size": 0})
    errors = cls.config_errors(spec)
    assert any(e.startswith("task.columns.question:") for e in errors)
    assert any(e.startswith("task.options.doc_stride=64:") for e in errors)
    assert any(e.startswith("task.options.n_best_size=0:") for e in errors)
    assert cls.config_errors(dataclasses.replace(spec, columns=dict(COLUMNS), options={"doc_stride": 16})) == []


def test_tiny_bert_gets_a_question_answering_head_whatever_num_labels():
    fam = get_task("question_answering")(TaskSpec(family="question_answering", columns=dict(COLUMNS), num_labels=5))
    model = fam.build_model(ModelSpec(config={**TINY_BERT, "vocab_size": 50}))
    assert type(model).__name__ == "BertForQuestionAnswering" and model.qa_outputs.out_features == 2


def test_serve_returns_a_character_span_of_the_context(tokenizer):
    import pandas as pd

    fam = family()
    torch.manual_seed(0)
    model = fam.build_model(ModelSpec(config={**TINY_BERT, "vocab_size": len(tokenizer)}, dropout=0.0)).eval()
    frame = pd.DataFrame({"question": [QUESTION, "who plays"], "context": [LONG, "bob plays the piano ."]})
    out = fam.serve(model, tokenizer, frame)
    assert list(out.columns) == ["answer", "score", "start", "end"] and len(out) == 2
    for context, row in zip(frame["context"], out.itertuples(), strict=True):
        assert row.answer and context[row.start : row.end] == row.answer
        assert 0.0 < row.score <= 1.0
    # the served answer is the one post-processing picks from the same windows
    features = datasets.Dataset.from_dict(fam.preprocess(tokenizer)(
        {"question": frame["question"].tolist(), "context": frame["context"].tolist()}, [0, 1]))
    batch, _ = fam.split_batch(fam.collator(tokenizer)([features[i] for i in range(len(features))]))
    with torch.no_grad():
        logits = model(**batch)
    records = fam.postprocess({"start_logits": logits.start_logits.numpy(), "end_logits": logits.end_logits.numpy()},
                              features)
    assert records["answer"].tolist() == out["answer"].tolist()


# --- evaluation over 2 gloo ranks -------------------------------------------------------------------

RANK_ROWS = [(QUESTION, LONG, "paris"), ("who plays", "bob plays the piano .", None),
             ("where does alice live", "alice lives in london .", "london"),
             ("where is the tower", LONG.replace("paris", "london"), "london"), ("who plays", "bob plays the piano .", "bob")]
RANK_BATCH = 2


def _evaluate_on_ranks(out_path: str) -> None:
    """One rank of the evaluate stage: trainer_core's Trainer (no training data) scores the features with
    Trainer.evaluate, i.e. the features sharded by Accelerate, eval_step per batch, the sequence outputs padded
    and gathered across the ranks, then the family's compute_metrics on the full split. Trainer.predict gives
    the gathered outputs that the predict stage post-processes. Run under torchrun (1 or 2 processes)."""
    import json
    import tempfile

    from trainer_core.args import TrainingArguments
    from trainer_core.trainer import Trainer

    fam = family(version_2_with_negative=True)
    tok = train_wordpiece([LONG, QUESTION, "bob plays the piano .", "who plays", "alice lives in london ."], 300)
    features = features_of(fam, tok, RANK_ROWS)
    torch.manual_seed(0)
    model = fam.build_model(ModelSpec(config={**TINY_BERT, "vocab_size": len(tok)}, dropout=0.0)).eval()
    args = TrainingArguments(per_device_eval_batch_size=RANK_BATCH, seed=0)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(model, args, eval_dataset=features, task=fam, task_spec=fam.spec, tokenizer=tok,
                          output_dir=out_dir)
        metrics = trainer.evaluate()
        outputs = trainer.predict(features).outputs
    if trainer.accelerator.is_main_process:
        records = fam.postprocess(outputs, features)
        result = {"num_features": int(len(outputs["start_logits"])), "answers": records["answer"].tolist(),
                  "scores": records["score"].tolist(), "metrics": metrics,
                  "world_size": trainer.accelerator.num_processes}
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    trainer.accelerator.wait_for_everyone()


@pytest.mark.integration
def test_evaluation_on_two_gloo_ranks_equals_one_process(tmp_path, tokenizer):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stages.launch import free_port

    repo = Path(__file__).resolve().parents[2]
    features = features_of(family(), tokenizer, RANK_ROWS)
    # round-robin batches of 2 over 2 ranks: feature f is on rank (f // 2) % 2; some example must span both
    ranks_of = {}
    for f, example in enumerate(features["example_id"]):
        ranks_of.setdefault(example, set()).add((f // RANK_BATCH) % 2)
    assert any(len(r) == 2 for r in ranks_of.values()), "the test needs an example split across the ranks"
    assert len(features) % (2 * RANK_BATCH), "the last round must be uneven (gather_for_metrics drops its padding)"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    env.pop("WORLD_SIZE", None)
    results = {}
    for world_size in (1, 2):
        out = tmp_path / f"ws{world_size}.json"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
             "--master_port", str(free_port()), "-m", "tests.tasks.test_question_answering", str(out)],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[world_size] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["num_features"] == two["num_features"] == len(features)
    assert two["answers"] == one["answers"] and len(one["answers"]) == len(RANK_ROWS)
    np.testing.assert_allclose(two["scores"], one["scores"], rtol=1e-5)
    assert two["metrics"].keys() == one["metrics"].keys() >= {f"eval_{m}" for m in
                                                              ("loss", "exact_match", "f1", "HasAns_f1", "NoAns_f1")}
    for key, value in one["metrics"].items():
        # (not eval_loss: the start / end softmax runs over the batch's padded width, which differs when the
        # last round is split unevenly over the ranks; answers and SQuAD metrics do not depend on it)
        if key != "eval_loss":
            assert two["metrics"][key] == pytest.approx(value), key


if __name__ == "__main__":  # a rank of test_evaluation_on_two_gloo_ranks_equals_one_process (under torchrun)
    import sys

    _evaluate_on_ranks(sys.argv[1])
