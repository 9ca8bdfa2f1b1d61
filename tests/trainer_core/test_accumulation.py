"""Gradient accumulation is a bigger batch: 4 x 8 micro-batches == 1 x 32, for example- and token-level losses.

SGD (linear in the gradient) makes any wrong normalisation visible; Adam would hide a constant factor.
atol 1e-6: same samples, only the float32 summation order differs.
"""

import copy

import pytest
import torch

from tests.trainer_core.factories import make_dataset, tiny_model
from trainer_core.args import TrainingArguments
from trainer_core.data import build_batch_plan
from trainer_core.spec import TaskSpec
from trainer_core.tasks import get_task
from trainer_core.trainer import Trainer


def _train(model, dataset, tmp_path, family, batch, accumulation, max_steps):
    args = TrainingArguments(
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=max_steps,
        learning_rate=0.1, max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        disable_tqdm=True, optimizer={"_target_": "torch.optim.SGD"},
    )
    # shuffled: both plans draw the same permutation (seeded by seed and epoch), cut into different batches
    plan = build_batch_plan(len(dataset), batch, accumulation, 0, max_steps, seed=7, shuffle=True)
    trainer = Trainer(model, args, train_dataset=dataset, batch_plan=plan, output_dir=tmp_path / f"{batch}x{accumulation}",
                      task=get_task(family), task_spec=TaskSpec(family=family, metrics=[]))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer.accelerator.unwrap_model(trainer.model).state_dict()


@pytest.mark.parametrize("family", ["text_classification", "token_classification"])
def test_accumulation_equals_bigger_batch(tmp_path, family):
    token_level = family == "token_classification"
    # 100 samples: the last step of each epoch holds 4 samples (one short micro-batch on the 4 x 8 side)
    dataset = make_dataset(100, seed=5, token_level=token_level, min_len=3, max_len=16)
    base = tiny_model(dropout=0.0, family=family, seed=2)
    small_losses, small = _train(copy.deepcopy(base), dataset, tmp_path, family, batch=8, accumulation=4, max_steps=6)
    big_losses, big = _train(copy.deepcopy(base), dataset, tmp_path, family, batch=32, accumulation=1, max_steps=6)

    assert small_losses == pytest.approx(big_losses, abs=1e-6)
    for name, value in small.items():
        torch.testing.assert_close(value, big[name], atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in small.items())


def test_token_loss_is_normalised_by_label_tokens_of_the_window():
    # two micro-batches with 1 and 3 labelled tokens: the mean over the 4 tokens, not the mean of the two means
    task = get_task("token_classification")(TaskSpec(family="token_classification"))
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[1, -100, -100], [0, 2, 3]])
    per_example = task.loss_per_example(logits, labels)
    counts = task.count_items({"labels": labels})
    assert counts.tolist() == [1, 3]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(per_example.sum() / counts.sum(), expected)
