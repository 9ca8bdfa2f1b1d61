"""The training step reads nothing off the device except on logging / eval / save steps.

On a GPU, `float(loss)`, `.item()`, `.tolist()` or `bool(t)` on a device tensor waits for the device: one such read per
step leaves the GPU idle while the host catches up. On this CPU every tensor is a host tensor, so the test patches
those methods and counts the reads made from the training path's own code (trainer_core, Accelerate) while each
step runs, attributed to the step in progress: outside the logging steps there must be none, and the logged numbers
must be what they were when each step read its loss.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.trainer_core.factories import make_trainer
from trainer_core.callbacks import TrainerCallback

TRAINING_PATH = (str(Path(__import__("trainer_core").__file__).parent), str(Path(__import__("accelerate").__file__).parent))
READS = ("item", "tolist", "__float__", "__int__", "__bool__")


class _StepInProgress(TrainerCallback):
    def __init__(self):
        self.step = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _count_reads(monkeypatch, progress: _StepInProgress, training: list[bool]) -> Counter:
    reads: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if training[0] and caller.startswith(TRAINING_PATH):
                reads[(progress.step, _name, Path(caller).name)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    return reads


def _stepping_trainer(tmp_path, monkeypatch, **overrides):
    """A trainer of 12 steps logging every 4th, its step in progress, and a flag that turns on at the first step
    (setup and resume may read and copy what they like)."""
    progress, training = _StepInProgress(), [False]
    trainer = make_trainer(tmp_path, train_n=96, max_steps=12, logging_steps=4, save_strategy="no",
                           callback_objects=[progress], **overrides)
    original_step = trainer.training_step

    def counted_step(*args, **kwargs):
        training[0] = True
        return original_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", counted_step)
    return trainer, progress, training


def test_no_host_reads_outside_logging_steps(tmp_path, monkeypatch) -> None:
    trainer, progress, training = _stepping_trainer(tmp_path, monkeypatch)
    reads = _count_reads(monkeypatch, progress, training)
    trainer.train()
    assert trainer.state.global_step == 12
    steps = {step for step, _, _ in reads}
    assert steps and steps <= {4, 8, 12}, sorted(reads.items())  # reads happen, and only on the logging steps


@pytest.mark.parametrize("loss", [None, {"_target_": "trainer_core.losses.WeightedCrossEntropy",
                                          "class_weights": [1.0, 3.0]}])
def test_the_step_copies_to_the_device_without_waiting_for_it(tmp_path, monkeypatch, loss) -> None:
    """On CUDA a host-to-device copy from pageable memory, `torch.tensor(x, device=...)` among them, makes the host
    wait for the device: every copy the step makes (its batches, the item count) is non_blocking (from pinned memory
    there), and no step builds a device tensor from host data outside the logging steps."""
    trainer, progress, training = _stepping_trainer(tmp_path, monkeypatch, **({"loss": loss} if loss else {}))
    moves, built = Counter(), Counter()
    original_to, original_tensor = torch.Tensor.to, torch.tensor

    def to(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if training[0] and caller.startswith(TRAINING_PATH):
            moves[kwargs.get("non_blocking", False) or not progress.step % 4] += 1  # logging steps may wait
        return original_to(self, *args, **kwargs)

    def tensor(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if training[0] and caller.startswith(TRAINING_PATH) and "device" in kwargs and progress.step % 4:
            built[(progress.step, Path(caller).name)] += 1
        return original_tensor(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "tensor", tensor)
    trainer.train()
    assert trainer.state.global_step == 12
    # per step: the item count and each batch tensor (input_ids, attention_mask, labels), none waiting
    assert moves[True] >= 12 * 4 and not moves[False], moves
    assert not built, sorted(built.items())


def test_the_logged_numbers_are_those_of_each_step(tmp_path, monkeypatch) -> None:
    """Read late, in one transfer: the loss means, gradient norms and training loss are the floats a read at each
    step gives (logging every step reads every step)."""
    histories, losses = [], []
    for logging_steps in (1, 3):
        trainer = make_trainer(tmp_path / str(logging_steps), train_n=96, max_steps=12, logging_steps=logging_steps,
                               save_strategy="no")
        result = trainer.train()
        histories.append([h for h in trainer.state.log_history if "loss" in h])
        losses.append(result.training_loss)
    every_step, every_third = histories
    assert losses[0] == losses[1]
    for logged in every_third:
        window = [h["loss"] for h in every_step if logged["step"] - 3 < h["step"] <= logged["step"]]
        assert logged["loss"] == pytest.approx(sum(window) / 3, rel=1e-12)
        (same_step,) = [h for h in every_step if h["step"] == logged["step"]]
        assert logged["grad_norm"] == same_step["grad_norm"] and logged["learning_rate"] == same_step["learning_rate"]


def test_evaluation_reads_each_batch_back_after_queuing_the_next(tmp_path, monkeypatch) -> None:
    """On a GPU reading a batch's outputs back waits for that batch: the loop reads batch i only once batch i+1 is
    queued, so the device is never idle between batches; its batches go to the device without waiting; and the
    metrics are the same as when each batch is read at once."""
    trainer = make_trainer(tmp_path, eval_n=40)  # 5 batches of 8
    baseline = trainer.evaluate()
    events, moves = [], Counter()
    original_step, original_cpu, original_to = trainer.task.eval_step, torch.Tensor.cpu, torch.Tensor.to

    def eval_step(model, inputs, targets):
        events.append(("step", None))
        step = original_step(model, inputs, targets)
        for tensor in (step.loss, *step.outputs.values()):
            tensor.batch = sum(kind == "step" for kind, _ in events)  # the batch these outputs come from
        return step

    def cpu(self, *args, **kwargs):
        if hasattr(self, "batch"):
            events.append(("read", self.batch))
        return original_cpu(self, *args, **kwargs)

    def to(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename.startswith(TRAINING_PATH):
            moves[kwargs.get("non_blocking", False)] += 1
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(trainer.task, "eval_step", eval_step)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert trainer.evaluate() == baseline
    steps = [i for i, (kind, _) in enumerate(events) if kind == "step"]
    assert len(steps) == 5
    for batch in range(1, 6):
        reads = [i for i, (kind, b) in enumerate(events) if kind == "read" and b == batch]
        assert reads, f"batch {batch}'s outputs were never read back"
        if batch < 5:  # read after the next batch was queued, before the one after it
            assert all(steps[batch] < i for i in reads), events
            assert batch + 1 == 5 or all(i < steps[batch + 1] for i in reads), events
    assert moves[True] >= 5 * 3 and not moves[False], moves
