"""Checkpoints: atomic layout, verification, refusal of unsafe or foreign ones, bitwise-exact resume."""

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.trainer_core.factories import Scripted, make_trainer
from trainer_core import checkpoint as ckpt
from trainer_core.callbacks import TrainerCallback


def test_layout_and_manifest(tmp_path):
    make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, config_hash="abc").train()
    path = ckpt.checkpoint_dir(tmp_path, 2)
    assert path.name == "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng_state_0.json", "scheduler.pt", "trainer_state.json",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["global_step"] == 2 and manifest["config_hash"] == "abc"
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng_state_0.json", "scheduler.pt",
                                      "trainer_state.json"}
    assert ckpt.verify(path) is None
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == 2
    # loadable without pickle
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "scheduler.pt", weights_only=True)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "alter", "no-manifest"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, caplog, damage):
    make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2).train()
    newest = ckpt.checkpoint_dir(tmp_path, 4)
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "alter":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    # trainer_core's logger does not propagate (its handler tags the rank): listen on it directly
    logging.getLogger("trainer_core").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="trainer_core"):
            assert ckpt.find_resumable(tmp_path) == ckpt.checkpoint_dir(tmp_path, 2)
    finally:
        logging.getLogger("trainer_core").removeHandler(caplog.handler)
    reason = {"truncate": "truncated file model.safetensors", "alter": "hash mismatch in model.safetensors",
              "no-manifest": "missing manifest"}[damage]
    assert any(reason in r.getMessage() and "step-00000004" in r.getMessage() for r in caplog.records)
    # a new trainer resumes from step 2, not 4
    resumed = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.setup()
    assert resumed.state.global_step == 2


def test_pickled_file_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    path = ckpt.checkpoint_dir(tmp_path, 2)
    (path / "extra.pkl").write_bytes(b"\x80\x04N.")
    trainer = make_trainer(tmp_path / "other", max_steps=4, resume_from_checkpoint=str(path))
    with pytest.raises(ValueError, match=r"extra\.pkl"):
        trainer.setup()


def test_config_hash_mismatch_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, config_hash="aaaa").train()
    trainer = make_trainer(tmp_path, max_steps=4, config_hash="bbbb")
    with pytest.raises(ValueError, match=r"'aaaa'.*'bbbb'"):
        trainer.setup()


class Kill(RuntimeError):
    pass


class KillAt(TrainerCallback):
    """Raise in the middle of the run: at `event` once global_step == step."""

    def __init__(self, event, step):
        self.event, self.step = event, step
        setattr(self, event, self._maybe_kill)

    def _maybe_kill(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Kill(f"killed at {self.event} after step {self.step}")


RESUME_ARGS = dict(train_n=40, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=12,
                   save_strategy="steps", save_steps=2, logging_steps=1, dropout=0.1, shuffle=True)


def _final_state(trainer):
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


@pytest.mark.parametrize(
    "event,step",
    [
        ("on_step_begin", 3),  # mid-epoch (5 steps an epoch): last checkpoint step 2, step 3 logged then lost
        ("on_substep_end", 7),  # mid accumulation window of step 8, in the second epoch: checkpoint 6
    ],
    ids=["mid-epoch", "mid-accumulation-window"],
)
def test_resume_equals_uninterrupted(tmp_path, event, step):
    reference = make_trainer(tmp_path / "ref", **RESUME_ARGS)
    reference.train()
    expected = _final_state(reference)
    expected_losses = [h["loss"] for h in reference.state.log_history if "loss" in h]

    killed = make_trainer(tmp_path / "run", callback_objects=[KillAt(event, step)], **RESUME_ARGS)
    with pytest.raises(Kill):
        killed.train()
    killed.cleanup()
    log = tmp_path / "run" / "metrics.jsonl"
    assert max(json.loads(line)["step"] for line in log.read_text().splitlines()) == step  # logged past the checkpoint

    resumed = make_trainer(tmp_path / "run", **RESUME_ARGS)  # fresh model, fresh RNG: everything comes from disk
    result = resumed.train()
    assert result.global_step == 12
    got = _final_state(resumed)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    # metrics.jsonl: every step exactly once, with the uninterrupted run's values
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["metrics"]["loss"] for r in records] == expected_losses
    assert result.training_loss == pytest.approx(reference.train_output.training_loss, abs=1e-12)


def test_a_run_moved_to_another_folder_finds_its_best_checkpoint_there(tmp_path):
    """A checkpoint fetched onto another machine names the best step by the folder it was saved in: the resumed
    run reads the best weights from its own copy (the first machine's folder is gone)."""
    import shutil

    best = dict(RESUME_ARGS, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                metric_for_best_model="accuracy", save_total_limit=2)
    scores = [0.5, 0.9, 0.6, 0.6]  # the best is step 4, before the kill, and stays the best
    reference = make_trainer(tmp_path / "ref", compute_metrics=Scripted(scores), **best)
    reference.train()
    killed = make_trainer(tmp_path / "a", callback_objects=[KillAt("on_step_begin", 9)],
                          compute_metrics=Scripted(scores), **best)
    with pytest.raises(Kill):
        killed.train()
    killed.cleanup()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    resumed = make_trainer(tmp_path / "b", compute_metrics=Scripted([0.6]), **best)
    resumed.train()
    assert resumed.state.best_model_checkpoint.startswith(str(tmp_path / "b"))
    assert Path(resumed.state.best_model_checkpoint).name == Path(reference.state.best_model_checkpoint).name \
        == "step-00000004"
    expected, got = _final_state(reference), _final_state(resumed)
    assert all(torch.equal(got[name], value) for name, value in expected.items())


def test_resume_to_a_later_max_step_adds_the_missing_steps(tmp_path):
    first = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, shuffle=False)
    first.train()
    first.cleanup()
    # more steps than the run was planned for: an explicit continuation, not a plain resume
    later = make_trainer(tmp_path, max_steps=7, save_strategy="steps", save_steps=2, shuffle=False,
                         continue_training=True, resume_from_checkpoint=str(ckpt.checkpoint_dir(tmp_path, 4)))
    result = later.train()
    assert result.global_step == 7
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"step-0000000{s}" for s in (2, 4, 6, 7)]


def test_a_damaged_best_checkpoint_is_refused_at_the_end_not_loaded(tmp_path):
    """load_best_model_at_end reads the best checkpoint's weights: a copy whose files no longer verify (bit rot, a bad
    copy) must stop the run with its name and the problem, not become the final model."""
    best = dict(max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                load_best_model_at_end=True, metric_for_best_model="accuracy")
    make_trainer(tmp_path, compute_metrics=Scripted([0.9, 0.5, 0.5]), **best).train()
    weights = ckpt.checkpoint_dir(tmp_path, 2) / "model.safetensors"  # the best: step 2
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # tensor data: loads without an error
        data[i] ^= 0x55
    weights.write_bytes(bytes(data))
    relaunch = make_trainer(tmp_path, compute_metrics=Scripted([0.5]), **best)  # resumes at step 6, then loads the best
    with pytest.raises(ValueError, match=r"step-00000002.*hash mismatch in model\.safetensors"):
        relaunch.train()


def test_a_full_disk_while_writing_final_fails_as_a_full_disk_and_leaves_nothing_partial(tmp_path, monkeypatch):
    """ENOSPC in save_final: the run's disk-full error (not retried by the train stage, names the space), no half
    written .tmp-final left taking space, the last checkpoint kept for the run that writes final/ once space is back."""
    import errno

    from trainer_core.checkpointing import CheckpointWriteFailed
    from trainer_core.spec import DISK_FULL

    trainer = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)

    def fill_up(folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)  # half written
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(model, "save_pretrained", fill_up)
    with pytest.raises(CheckpointWriteFailed, match=rf"{DISK_FULL}.*no space left.*step-00000004 is kept"):
        trainer.save_final()
    assert not (tmp_path / ".tmp-final").exists() and not (tmp_path / "final").exists()
    assert ckpt.find_resumable(tmp_path) == ckpt.checkpoint_dir(tmp_path, 4)
