"""Strategies judged by what a run leaves behind: log lines, evaluations, checkpoint folders, weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_core.factories import Scripted, make_trainer
from trainer_core import checkpoint as ckpt
from trainer_core.callbacks import TrainerCallback


def _jsonl(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _steps(output_dir):
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(output_dir)]


def test_logged_evaluated_and_saved_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, logging_steps=3, eval_strategy="steps", eval_steps=4,
                           save_strategy="steps", save_steps=4)
    result = trainer.train()
    records = _jsonl(tmp_path)
    assert [r["step"] for r in records if "loss" in r["metrics"]] == [3, 6, 9]
    # steps 4 and 8, and the last step (transformers 5: a steps strategy evaluates the end of training too)
    assert [r["step"] for r in records if "eval_loss" in r["metrics"]] == [4, 8, 10]
    assert {"loss", "learning_rate", "grad_norm"} <= records[0]["metrics"].keys()
    assert {"eval_loss", "eval_accuracy"} <= records[1]["metrics"].keys()
    # steps 4 and 8, and the last step always under a steps strategy
    assert _steps(tmp_path) == [4, 8, 10]
    assert result.global_step == 10
    # an epoch is 3 steps of 8 samples: epoch of step 4 is 1 + 1/3
    assert records[1]["epoch"] == pytest.approx(4 / 3)


@pytest.mark.parametrize("strategies", [
    dict(logging_steps=3, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4),
    dict(logging_steps=5, logging_first_step=True, eval_strategy="steps", eval_steps=5, save_strategy="steps",
         save_steps=10),
    dict(logging_steps=2, eval_strategy="steps", save_strategy="no"),  # eval_steps from logging_steps
    dict(logging_steps=4, eval_strategy="no", save_strategy="steps", save_steps=3),
    dict(logging_steps=4, eval_strategy="epoch", save_strategy="epoch"),
])
def test_flow_decisions_match_transformers(tmp_path, strategies):
    # log / evaluate / save / stop after each step, ours against transformers' DefaultFlowCallback
    from transformers import TrainingArguments as HFArgs
    from transformers.trainer_callback import DefaultFlowCallback as HFFlow
    from transformers.trainer_callback import TrainerControl as HFControl
    from transformers.trainer_callback import TrainerState as HFState

    from trainer_core.args import TrainingArguments
    from trainer_core.callbacks import DefaultFlowCallback, TrainerControl, TrainerState

    max_steps = 11
    ours_args, hf_args = TrainingArguments(max_steps=max_steps, **strategies), HFArgs(
        output_dir=str(tmp_path), max_steps=max_steps, use_cpu=True, report_to=[], **strategies)
    ours_state = TrainerState(max_steps=max_steps)
    hf_state = HFState(max_steps=max_steps, logging_steps=hf_args.logging_steps, eval_steps=hf_args.eval_steps,
                       save_steps=hf_args.save_steps)
    flags = ("should_log", "should_evaluate", "should_save", "should_training_stop")
    for step in range(1, max_steps + 1):
        ours_state.global_step = hf_state.global_step = step
        ours = DefaultFlowCallback().on_step_end(ours_args, ours_state, TrainerControl())
        theirs = HFFlow().on_step_end(hf_args, hf_state, HFControl())
        assert {f: getattr(ours, f) for f in flags} == {f: getattr(theirs, f) for f in flags}, step
        ours = DefaultFlowCallback().on_epoch_end(ours_args, ours_state, TrainerControl())
        theirs = HFFlow().on_epoch_end(hf_args, hf_state, HFControl())
        assert {f: getattr(ours, f) for f in flags[1:3]} == {f: getattr(theirs, f) for f in flags[1:3]}, step


def test_last_step_can_be_the_best(tmp_path):
    # eval every 4 steps of 10: the last step is evaluated too, and its checkpoint is the best one loaded
    trainer = make_trainer(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                           save_steps=4, save_total_limit=1, load_best_model_at_end=True,
                           metric_for_best_model="accuracy", compute_metrics=Scripted([0.5, 0.6, 0.9]))
    trainer.train()
    assert trainer.state.best_metric == 0.9
    assert trainer.state.best_model_checkpoint == str(ckpt.checkpoint_dir(tmp_path, 10))
    assert _steps(tmp_path) == [10]


def test_epoch_strategies(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=-1, num_train_epochs=2, logging_steps=100, eval_strategy="epoch",
                           save_strategy="epoch")
    trainer.train()
    assert [r["step"] for r in _jsonl(tmp_path) if "eval_loss" in r["metrics"]] == [3, 6]
    assert _steps(tmp_path) == [3, 6]


def test_rotation_keeps_best_and_best_is_loaded_at_end(tmp_path):
    # the best accuracy comes from the first evaluation (step 2); later ones are worse
    trainer = make_trainer(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                           save_steps=2, save_total_limit=2, load_best_model_at_end=True,
                           metric_for_best_model="accuracy", compute_metrics=Scripted([0.9, 0.5, 0.6, 0.4, 0.3]))
    trainer.train()
    best = ckpt.checkpoint_dir(tmp_path, 2)
    assert trainer.state.best_model_checkpoint == str(best)
    assert trainer.state.best_metric == 0.9
    assert _steps(tmp_path) == [2, 10]  # the best survives rotation, plus the newest
    saved = load_file(str(best / "model.safetensors"))
    model = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, value in saved.items():
        assert torch.equal(model[name], value), name
    last = load_file(str(ckpt.checkpoint_dir(tmp_path, 10) / "model.safetensors"))
    assert not torch.equal(last["classifier.weight"], saved["classifier.weight"])


def test_rotation_without_best(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=7, save_strategy="steps", save_steps=2, save_total_limit=2)
    trainer.train()
    assert _steps(tmp_path) == [6, 7]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_early_stopping_end_step(tmp_path):
    # best at eval 1 (step 2); evals 2 and 3 do not improve by more than the threshold -> stop at step 6
    trainer = make_trainer(tmp_path, max_steps=20, eval_strategy="steps", eval_steps=2, metric_for_best_model="accuracy",
                           early_stopping_patience=2, early_stopping_threshold=0.05, save_strategy="steps",
                           save_steps=2, compute_metrics=Scripted([0.5, 0.52, 0.54, 0.9]))
    result = trainer.train()
    assert result.global_step == 6
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4, 6]
    # the counters travel in the checkpoints, so a resumed run stops at the same step
    saved = json.loads((ckpt.checkpoint_dir(tmp_path, 4) / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["EarlyStoppingCallback"] == {"patience_counter": 1}


def _hf_early_stop_step(scores, patience, threshold, eval_steps, max_steps):
    """The step transformers' EarlyStoppingCallback stops at, the best metric updated as its Trainer does
    (_determine_best_metric: after on_evaluate, on any improvement)."""
    from transformers import TrainingArguments as HFArgs
    from transformers.trainer_callback import EarlyStoppingCallback as HFEarlyStopping
    from transformers.trainer_callback import TrainerControl as HFControl
    from transformers.trainer_callback import TrainerState as HFState

    args = HFArgs(output_dir="unused", use_cpu=True, report_to=[], metric_for_best_model="accuracy")
    callback, state, control = HFEarlyStopping(patience, threshold), HFState(), HFControl()
    for i, score in enumerate(scores):
        callback.on_evaluate(args, state, control, metrics={"eval_accuracy": score})
        if state.best_metric is None or score > state.best_metric:
            state.best_metric = score
        if control.should_training_stop:
            return (i + 1) * eval_steps
    return max_steps


def test_early_stopping_threshold_is_against_the_running_best_as_transformers(tmp_path):
    # each evaluation improves by 0.03 < threshold 0.05 on the one before (two add up to more than it): transformers
    # counts each as no improvement, so patience 2 stops at the 3rd evaluation
    scores, patience, threshold = [0.5, 0.53, 0.56, 0.59, 0.62, 0.65, 0.68, 0.71, 0.74, 0.77], 2, 0.05
    trainer = make_trainer(tmp_path, max_steps=20, eval_strategy="steps", eval_steps=2, metric_for_best_model="accuracy",
                           early_stopping_patience=patience, early_stopping_threshold=threshold,
                           compute_metrics=Scripted(scores))
    result = trainer.train()
    assert result.global_step == _hf_early_stop_step(scores, patience, threshold, 2, 20) == 6


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            events = object.__getattribute__(self, "events")

            def record(args, state, control, **kwargs):
                events.append((name, state.global_step))

            return record
        return object.__getattribute__(self, name)


def test_callback_event_order(tmp_path):
    # 24 samples, batch 8, accumulation 2: an epoch is a step of 2 micro-batches then a step of 1
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=4, gradient_accumulation_steps=2, logging_steps=2,
                           callback_objects=[recorder])
    trainer.train()
    assert recorder.events == [
        ("on_init_end", 0), ("on_train_begin", 0),
        ("on_epoch_begin", 0), ("on_step_begin", 0), ("on_substep_end", 0), ("on_step_end", 1),
        ("on_step_begin", 1), ("on_step_end", 2), ("on_log", 2), ("on_epoch_end", 2),
        ("on_epoch_begin", 2), ("on_step_begin", 2), ("on_substep_end", 2), ("on_step_end", 3),
        ("on_step_begin", 3), ("on_step_end", 4), ("on_log", 4), ("on_epoch_end", 4),
        ("on_train_end", 4),
    ]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_callback_stops_training(tmp_path):
    result = make_trainer(tmp_path, max_steps=20, callback_objects=[StopAt(3)]).train()
    assert result.global_step == 3


def test_callbacks_from_config(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=20, callbacks=[{"_target_": "tests.trainer_core.test_strategies.StopAt", "step": 2}])
    assert trainer.train().global_step == 2


class CutEpoch(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            control.should_epoch_stop = True
        return control


def test_should_epoch_stop_jumps_to_next_epoch(tmp_path):
    # 3 steps an epoch: stopping epoch 0 after step 1 jumps the cursor to step 3 (epoch 1's first)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=6, logging_steps=1, callback_objects=[CutEpoch(), recorder])
    result = trainer.train()
    assert result.global_step == 6
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 4, 5, 6]
    assert [s for e, s in recorder.events if e == "on_epoch_begin"] == [0, 3]
    # logging every step: each logged loss is its step's, and training_loss their mean over the 4 trained steps
    # (as transformers, whose global_step counts trained steps only); the skipped steps 2 and 3 count in neither
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.training_loss == pytest.approx(sum(logged) / 4, rel=1e-6)
    assert min(logged[1:]) > 0.5 * max(logged[1:])  # step 4's loss was divided by the 3 steps since step 1


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    import copy

    from tests.trainer_core.factories import tiny_model

    base = tiny_model(dropout=0.0, seed=4)
    plain = make_trainer(tmp_path / "a", model=copy.deepcopy(base), max_steps=3)
    checkpointed = make_trainer(tmp_path / "b", model=copy.deepcopy(base), max_steps=3, gradient_checkpointing=True)
    plain.train()
    checkpointed.train()
    unwrapped = checkpointed.accelerator.unwrap_model(checkpointed.model)
    assert getattr(unwrapped, "is_activation_checkpointing", None) or unwrapped.is_gradient_checkpointing
    a = plain.accelerator.unwrap_model(plain.model).state_dict()
    b = checkpointed.accelerator.unwrap_model(checkpointed.model).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
