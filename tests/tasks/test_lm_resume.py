"""Kill and resume of language-model runs is bitwise equal to the uninterrupted run: causal LM with packed blocks
(per-document positions, block-diagonal mask) and masked LM (masks drawn from torch's RNG in the collator).

In-process, like tests/trainer_core/test_checkpoints.py: the run raises mid-epoch after a checkpoint, a fresh
Trainer with a freshly initialised model resumes from disk; weights and every logged loss must be equal.
(The external SIGKILL of real ranks at every phase is tests/fault_tolerance/'s, for any family.)
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from tests.tasks.factories import family_cases, tokenizer_for
from trainer_core.args import TrainingArguments
from trainer_core.callbacks import TrainerCallback
from trainer_core.data import build_batch_plan
from trainer_core.tasks import get_task
from trainer_core.trainer import Trainer

TEXTS = [f" Document {i} tells of {w} and of the {v} river , as the story goes on and on . \n"
         for i, (w, v) in enumerate(zip(["kings", "ships", "songs", "cats", "bells", "rain", "maps", "tea"] * 3,
                                        ["red", "long", "cold", "wide", "slow", "old"] * 4, strict=False))]


class Crash(RuntimeError):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"killed before step {self.step + 1}")


def _trainer(name, tmp_path, features, tokenizer, callbacks=()):
    case = family_cases()[name]
    family = get_task(name)(case.spec)
    config = {**case.model.config, "vocab_size": len(tokenizer)}
    torch.manual_seed(123)  # a different init each time would be overwritten by the checkpoint anyway
    model = family.build_model(type(case.model)(**{**vars(case.model), "config": config, "dropout": 0.1}))
    args = TrainingArguments(per_device_train_batch_size=4, max_steps=8, learning_rate=5e-3, logging_steps=1,
                             save_strategy="steps", save_steps=3, disable_tqdm=True, seed=7,
                             train_sampling_strategy="random")
    plan = build_batch_plan(len(features), 4, 1, 0, 8, seed=7, shuffle=True)
    return Trainer(model, args, train_dataset=features, batch_plan=plan, output_dir=tmp_path, task=family,
                   tokenizer=tokenizer, callbacks=list(callbacks))


@pytest.mark.parametrize("name", ["causal_lm", "masked_lm"])
def test_kill_and_resume_is_bitwise_equal(tmp_path, monkeypatch, name):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    case = family_cases()[name]
    family = get_task(name)(case.spec)
    raw = {"text": TEXTS}
    tokenizer = (case.processor or tokenizer_for)(family, raw)
    data = datasets.Dataset.from_dict(raw)
    features = data.map(family.preprocess(tokenizer), batched=True, with_indices=True, remove_columns=["text"])
    assert len(features) >= 16

    reference = _trainer(name, tmp_path / "ref", features, tokenizer)
    reference.train()
    expected = reference.accelerator.unwrap_model(reference.model).state_dict()
    expected_losses = [h["loss"] for h in reference.state.log_history if "loss" in h]

    crashed = _trainer(name, tmp_path / "run", features, tokenizer, [CrashAt(5)])  # checkpoint 3, steps 4-5 lost
    with pytest.raises(Crash):
        crashed.train()
    crashed.cleanup()
    resumed = _trainer(name, tmp_path / "run", features, tokenizer)
    assert resumed.train().global_step == 8
    got = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["metrics"]["loss"] for r in records] == expected_losses
