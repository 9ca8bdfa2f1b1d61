"""trainer.resume_from_checkpoint / continue_training / warm_start, and clear refusals of bad input
(in-process: a tiny model, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer_core.factories import make_trainer, tiny_model
from trainer_core import checkpoint as ckpt

ARGS = dict(max_steps=4, save_strategy="steps", save_steps=2, dropout=0.1)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _weights(trainer):
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


def _train(path, **kwargs):
    trainer = make_trainer(path, **{**ARGS, **kwargs})
    trainer.train()
    trainer.cleanup()
    return trainer


def test_resume_from_another_run_folder_equals_uninterrupted(tmp_path, capfd):
    reference = _train(tmp_path / "ref")
    step2 = ckpt.checkpoint_dir(tmp_path / "ref", 2)
    capfd.readouterr()
    resumed = _train(tmp_path / "other", resume_from_checkpoint=str(step2))
    assert f"Resuming from checkpoint {step2}" in capfd.readouterr().err
    assert resumed.state.global_step == 4
    for name, value in _weights(reference).items():
        assert torch.equal(_weights(resumed)[name], value), name
    # the new folder's metrics start after the checkpoint; its own checkpoints follow
    steps = [json.loads(x)["step"] for x in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "other")] == ["step-00000004"]


def test_relaunch_of_a_run_started_from_elsewhere_resumes_its_own_checkpoint(tmp_path, capfd):
    _train(tmp_path / "ref")
    step2 = ckpt.checkpoint_dir(tmp_path / "ref", 2)
    _train(tmp_path / "other", resume_from_checkpoint=str(step2), save_steps=1)
    # as if killed after step 3's checkpoint: a relaunch must continue from step 3, not from ref's step 2
    import shutil

    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "other", 4))
    capfd.readouterr()
    again = make_trainer(tmp_path / "other", **{**ARGS, "save_steps": 1}, resume_from_checkpoint=str(step2))
    again.setup()
    assert again.state.global_step == 3
    assert "already has checkpoint" in capfd.readouterr().err


def test_more_steps_needs_continue_training(tmp_path):
    _train(tmp_path / "run")
    last = ckpt.checkpoint_dir(tmp_path / "run", 4)
    longer = make_trainer(tmp_path / "longer", **{**ARGS, "max_steps": 6}, resume_from_checkpoint=str(last))
    with pytest.raises(ValueError, match=r"run of 4 steps.*plans 6.*trainer\.continue_training=true"):
        longer.setup()
    # a final/ folder is no checkpoint: refused without the flag, continued from its last checkpoint with it
    final = tmp_path / "run" / "final"
    _final(tmp_path / "run")
    with pytest.raises(ValueError, match=r"finished model \(final/\).*continue_training"):
        make_trainer(tmp_path / "l2", **{**ARGS, "max_steps": 6}, resume_from_checkpoint=str(final)).setup()
    continued = make_trainer(tmp_path / "l3", **{**ARGS, "max_steps": 6}, resume_from_checkpoint=str(final),
                             continue_training=True)
    result = continued.train()
    assert result.global_step == 6
    steps = [json.loads(x)["step"] for x in (tmp_path / "l3" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6]
    # nothing to continue when the checkpoint is already at (or past) the planned end
    with pytest.raises(ValueError, match="nothing to continue"):
        make_trainer(tmp_path / "l4", **ARGS, resume_from_checkpoint=str(last), continue_training=True).setup()


def _final(path: Path) -> None:
    trainer = make_trainer(path, **ARGS)
    trainer.train()  # already complete: resumes at step 4, nothing left
    trainer.save_final()
    trainer.cleanup()


def test_different_model_or_task_is_refused_naming_the_difference(tmp_path):
    first = make_trainer(tmp_path / "run", **ARGS, config_hash="aaaa")
    first.config_components.update({"model": "tiny_bert", "data.fingerprint": "d1"})
    first.train()
    path = ckpt.checkpoint_dir(tmp_path / "run", 2)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["config_components"]["model"] == "tiny_bert"
    assert manifest["config_components"]["num_labels"] == 2
    other = make_trainer(tmp_path / "other", **ARGS, config_hash="bbbb", resume_from_checkpoint=str(path),
                         model=tiny_model(num_labels=3, seed=3))
    other.config_components.update({"model": "tiny_bert", "data.fingerprint": "d2"})
    with pytest.raises(ValueError) as err:
        other.setup()
    message = str(err.value)
    assert "num_labels: 2 in the checkpoint, 3 in this run" in message
    assert "data.fingerprint: 'd1' in the checkpoint, 'd2' in this run" in message
    assert "model:" not in message.split("What differs:")[1]  # the same model is not reported
    assert "trainer.warm_start=true" in message


def test_warm_start_loads_only_the_matching_weights(tmp_path, capfd):
    source = _train(tmp_path / "run", config_hash="aaaa")
    path = ckpt.checkpoint_dir(tmp_path / "run", 4)
    capfd.readouterr()
    warm = make_trainer(tmp_path / "warm", **ARGS, config_hash="bbbb", resume_from_checkpoint=str(path),
                        warm_start=True, model=tiny_model(num_labels=3, seed=3))
    warm.setup()
    assert warm.state.global_step == 0
    assert "Warm start from" in (log := capfd.readouterr().err) and "classifier.weight" in log
    got, src = _weights(warm), _weights(source)
    assert torch.equal(got["bert.embeddings.word_embeddings.weight"], src["bert.embeddings.word_embeddings.weight"])
    assert got["classifier.weight"].shape[0] == 3


def test_pickled_file_is_refused_naming_it(tmp_path):
    _train(tmp_path / "run")
    path = ckpt.checkpoint_dir(tmp_path / "run", 2)
    (path / "rng_state.pth").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match=r"rng_state\.pth.*pickled"):
        make_trainer(tmp_path / "other", **ARGS, resume_from_checkpoint=str(path)).setup()
    with pytest.raises(ValueError, match=r"pickled files \(rng_state\.pth\)"):
        make_trainer(tmp_path / "warm", **ARGS, resume_from_checkpoint=str(path), warm_start=True).setup()


def test_flags_need_a_checkpoint():
    from trainer_core.args import TrainingArguments

    errors = TrainingArguments(warm_start=True, continue_training=True).validate()
    assert any("warm_start=true needs trainer.resume_from_checkpoint" in e for e in errors)
    assert any("exclude each other" in e for e in errors)


def test_resume_from_another_run_keeps_its_best_checkpoint_for_load_best_model_at_end(tmp_path):
    """The best so far is a checkpoint of the run resumed from (no later evaluation beats it): the new run's final
    model is that checkpoint's weights, read where it lies, not a missing folder of the new run."""
    from safetensors.torch import load_file

    from tests.trainer_core.factories import Scripted

    best = dict(ARGS, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                metric_for_best_model="accuracy", max_steps=6)
    make_trainer(tmp_path / "ref", compute_metrics=Scripted([0.9, 0.5, 0.5]), **best).train()
    step2, step4 = (ckpt.checkpoint_dir(tmp_path / "ref", s) for s in (2, 4))
    resumed = make_trainer(tmp_path / "other", compute_metrics=Scripted([0.5]), resume_from_checkpoint=str(step4),
                           **best)
    resumed.train()
    assert resumed.state.best_model_checkpoint == str(step2)
    expected = load_file(str(step2 / "model.safetensors"))
    for name, value in expected.items():
        assert torch.equal(_weights(resumed)[name], value), name
    # its own checkpoints record where the best lies: a relaunch of the new run finds it there too
    resumed.cleanup()
    relaunch = make_trainer(tmp_path / "other", compute_metrics=Scripted([0.5]), resume_from_checkpoint=str(step4),
                            **best)
    relaunch.setup()
    assert relaunch.state.best_model_checkpoint == str(step2)
