"""evaluate / predict: every sample once, metrics offline, preprocess_logits_for_metrics, token-level padding."""

import numpy as np
import torch

from tests.trainer_core.factories import make_trainer


def test_predict_with_preprocess_logits(tmp_path):
    calls = []

    def argmax(logits, labels):
        calls.append(logits.shape)
        return logits.argmax(-1)

    trainer = make_trainer(tmp_path, eval_n=13, metrics=("accuracy", "f1", "matthews_correlation"))
    plain = trainer.predict(trainer.eval_dataset)
    trainer.preprocess_logits_for_metrics = argmax
    reduced = trainer.predict(trainer.eval_dataset)
    assert plain.predictions.shape == (13, 2) and reduced.predictions.shape == (13,)
    assert np.array_equal(reduced.predictions, plain.predictions.argmax(-1))
    assert calls == [(8, 2), (5, 2)]
    assert plain.metrics == reduced.metrics
    accuracy = float((plain.predictions.argmax(-1) == plain.label_ids).mean())
    assert plain.metrics["test_accuracy"] == accuracy
    assert {"test_loss", "test_f1", "test_matthews_correlation"} <= plain.metrics.keys()


def test_token_level_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, family="token_classification", eval_n=11, per_device_eval_batch_size=4)
    out = trainer.predict(trainer.eval_dataset)
    lengths = [len(x) for x in trainer.eval_dataset["input_ids"]]
    assert out.predictions.shape == (11, max(lengths), 2)
    assert out.label_ids.shape == (11, max(lengths))
    # padding across batches is -100 and is left out of the metrics
    mask = out.label_ids != -100
    accuracy = float((out.predictions.argmax(-1)[mask] == out.label_ids[mask]).mean())
    assert abs(out.metrics["test_accuracy"] - accuracy) < 1e-12
    # the loss is per labelled token over the whole split
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in trainer.eval_dataset:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            labels = torch.tensor(row["labels"])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert abs(out.metrics["test_loss"] - total / count) < 1e-5


def test_evaluate_does_not_move_the_training_rng(tmp_path):
    trainer = make_trainer(tmp_path)
    before = torch.get_rng_state()
    trainer.evaluate()
    assert torch.equal(before, torch.get_rng_state())
