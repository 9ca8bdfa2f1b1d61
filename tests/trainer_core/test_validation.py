"""Bad config: one clear error listing every problem, before any training."""

import pytest

import trainer_core.precision as precision_module
from tests.trainer_core.factories import make_trainer


def test_all_errors_at_once_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "bf16_supported", lambda: False)
    with pytest.raises(ValueError) as info:
        make_trainer(
            tmp_path / "run", warmup_ratio=1.5, load_best_model_at_end=True, eval_strategy="steps", eval_steps=2,
            save_strategy="epoch", metric_for_best_model="bleu", mixed_precision="bf16",
        )
    message = str(info.value)
    assert message.startswith("Config is not well-formed, found the following errors:\n - ")
    assert "trainer.warmup_ratio=1.5" in message
    assert "save_strategy to match eval_strategy" in message
    assert "metric_for_best_model='bleu'" in message and "accuracy" in message
    assert "bf16 precision was requested but not available on this hardware" in message
    assert message.count("\n - ") == 4
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(warmup_ratio=-0.1), "warmup_ratio=-0.1"),
        (dict(load_best_model_at_end=True), "load_best_model_at_end=true needs an eval strategy"),
        (dict(metric_for_best_model="eval_f1"), "metric_for_best_model='eval_f1'"),
        (dict(early_stopping_patience=2), "early_stopping_patience needs evaluations"),
        (dict(mixed_precision="fp16"), "fp16: needs a CUDA GPU"),
        # transformers reads these as ratios of the steps; taken as step counts they would never trigger
        (dict(logging_steps=0.1), "trainer.logging_steps=0.1: use a whole number"),
        (dict(eval_strategy="steps", eval_steps=0.25), "trainer.eval_steps=0.25: use a whole number"),
        (dict(save_strategy="steps", save_steps=0.5), "trainer.save_steps=0.5: use a whole number"),
    ],
)
def test_single_errors(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match="Config is not well-formed") as info:
        make_trainer(tmp_path, **overrides)
    assert needle in str(info.value)


def test_known_metric_with_prefix_is_accepted(tmp_path):
    trainer = make_trainer(tmp_path, metric_for_best_model="eval_accuracy", eval_strategy="steps", eval_steps=2)
    assert trainer.args.best_metric_key() == "eval_accuracy"


def test_plan_for_other_hardware_is_refused(tmp_path):
    from trainer_core.data import build_batch_plan
    from trainer_core.trainer import Trainer

    trainer = make_trainer(tmp_path)
    plan = build_batch_plan(24, 16, 1, 1, -1, seed=0)  # built for 2 ranks x 8
    with pytest.raises(ValueError, match=r"x world size \(1\) = 8"):
        Trainer(trainer.model, trainer.args, train_dataset=trainer.train_dataset, batch_plan=plan,
                output_dir=tmp_path)
