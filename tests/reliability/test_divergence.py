"""The divergence guard: the first NaN/inf loss or gradient norm stops training with one clear error.

In process on a tiny model (trainer_core), then the whole flow as a user runs it: the train stage fails once
(no retry), the CLI's `error:` line names the step and the fix, nothing is registered.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer_core.factories import make_trainer
from trainer_core.trainer import TrainingDiverged

DIVERGING = {"learning_rate": 1e6, "max_grad_norm": 0.0}


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # in-process trainers are one process


def test_first_nonfinite_step_stops_training_with_one_clear_error(tmp_path) -> None:
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, **DIVERGING)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message
    step = trainer.state.global_step + 1  # the step that went non-finite: the state holds the last healthy one
    assert step < trainer.plan.num_steps
    assert message.startswith("training diverged:") and f"at step {step}" in message
    for hint in ("trainer.learning_rate", "trainer.max_grad_norm", "fp32", "trainer.stop_on_nonfinite"):
        assert hint in message
    # the healthy steps were saved, the diverged one was not
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved == [f"step-{s:08d}" for s in range(1, step)]


def test_stop_on_nonfinite_false_trains_on_like_the_hf_trainer(tmp_path) -> None:
    trainer = make_trainer(tmp_path, stop_on_nonfinite=False, **DIVERGING)
    assert trainer.train().global_step == trainer.plan.num_steps


def test_the_guard_leaves_a_healthy_run_bit_identical(tmp_path) -> None:
    weights = []
    for guard in (True, False):
        trainer = make_trainer(tmp_path / str(guard), stop_on_nonfinite=guard)
        trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_fp16_step_the_grad_scaler_skipped_is_not_a_divergence(tmp_path, monkeypatch) -> None:
    trainer = make_trainer(tmp_path)
    assert not trainer._finite(0.5, float("inf"), skipped=False)
    assert trainer._finite(float("inf"), float("inf"), skipped=True)  # the scaler lowers its scale, skips the step
    # only fp16 asks the scaler (asking is a host sync)
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    assert not trainer._step_skipped()
    trainer.args.mixed_precision = "fp16"
    assert trainer._step_skipped()


@pytest.mark.integration
def test_a_diverging_flow_fails_in_train_and_registers_nothing(run_cli, tmp_path) -> None:
    from mlflow import MlflowClient

    root = tmp_path / "state"
    done = run_cli([
        "model=tiny_bert", "trainer.learning_rate=1e6", "trainer.max_grad_norm=0", "trainer.max_steps=8",
        "trainer.per_device_train_batch_size=16", "trainer.save_steps=4", "trainer.logging_steps=1",
        "task.max_train_samples=128", "task.max_eval_samples=32", "task.max_predict_samples=32",
        f"paths.root={root}",
    ], timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-4000:]
    assert "training diverged:" in errors[0] and "at step " in errors[0]
    assert "trainer.learning_rate" in errors[0] and "trainer.max_grad_norm" in errors[0]
    # launched once: a retry would only diverge again
    assert output.count("train: cache miss") == 1 and output.count("accelerate.commands.launch --config_file") == 1
    assert "Task run 'register" not in output
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.search_model_versions("") == []
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
