"""Kill it anywhere, lose nothing: SIGKILL real training processes from outside, relaunch, compare bitwise.

Each configuration (1 process; 2 gloo ranks under `accelerate launch`) trains one uninterrupted reference.
The same spec is then launched with FT_KILL_AT set; the KillPoint callback (killpoints.py) prints a marker
and parks at that point; the test sends SIGKILL to the launcher and every rank; it checks what is on disk
(newest committed checkpoint, leftover temp folder) and relaunches the same spec, killing it again at the next
point, and so on: one run killed at every point in turn, each relaunch resuming from the previous kill's
newest complete checkpoint (what Prefect retries do). The last relaunch runs to the end: every tensor of
final/model.safetensors is torch.equal to the reference's, and metrics.jsonl holds every step once with
the reference's values. Dropout is on (0.1) and the plan is shuffled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fault_tolerance.conftest import (
    EVAL_STEPS,
    MAX_STEPS,
    assert_same_weights,
    final_weights,
    run_and_kill,
    run_to_end,
    write_spec,
)
from trainer_core import checkpoint as ckpt

pytestmark = pytest.mark.integration

# name -> (FT_KILL_AT, the newest complete checkpoint after the kill). 5 steps an epoch (ends at 5 and 10),
# checkpoints every 2 steps, evaluations every 3.
KILL_POINTS = {
    "mid_epoch": ("step_end:3", 2),
    "mid_accumulation_window": ("substep:6", 6),  # between the 2 micro-batches of step 7
    "checkpoint_write": ("save:8", 6),  # every file of .tmp-step-00000008 written, the manifest not yet
    "evaluation": ("eval:9", 8),  # after the first batch of the evaluation at step 9
    "after_epoch_boundary": ("epoch_begin:10", 10),  # epoch 2 ended and was saved, epoch 3 about to start
}


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _expected_steps() -> list[int]:
    return [s for step in range(1, MAX_STEPS + 1) for s in ([step, step] if step % EVAL_STEPS == 0 else [step])]


def _kill_at_each_then_finish(tmp_path: Path, world_size: int, names: list[str]) -> None:
    spec, reference_out = write_spec(tmp_path, "reference", world_size)
    run_to_end(spec, world_size)
    expected, expected_metrics = final_weights(reference_out), _metrics(reference_out)
    assert [r["step"] for r in expected_metrics] == _expected_steps()

    spec, out = write_spec(tmp_path, "killed", world_size)
    resumed_from = None
    for name in names:
        point, newest = KILL_POINTS[name]
        log = run_and_kill(spec, world_size, point)
        if resumed_from is not None:
            assert f"Resuming from checkpoint {ckpt.checkpoint_dir(out, resumed_from)}" in log, (name, log[-3000:])
        assert not (out / "final").exists(), (name, log[-3000:])
        committed = [p.name for p in ckpt.list_checkpoints(out)]
        assert committed[-1] == f"step-{newest:08d}", (name, committed, log[-3000:])
        assert ckpt.verify(ckpt.checkpoint_dir(out, newest)) is None
        if name == "checkpoint_write":
            tmp = out / "checkpoints" / ".tmp-step-00000008"
            assert (tmp / "model.safetensors").is_file() and not (tmp / "manifest.json").exists()
        resumed_from = newest

    log = run_to_end(spec, world_size)
    assert f"Resuming from checkpoint {ckpt.checkpoint_dir(out, resumed_from)}" in log
    assert_same_weights(final_weights(out), expected)
    assert _metrics(out) == expected_metrics  # every step once: losses, rates, grad norms, eval metrics, bit for bit
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())


def test_one_process_killed_at_every_point_equals_uninterrupted(tmp_path):
    _kill_at_each_then_finish(tmp_path, 1, list(KILL_POINTS))


def test_two_ranks_killed_while_saving_and_evaluating_equal_uninterrupted(tmp_path):
    # (the 2-rank kill between two micro-batches is tests/trainer_core/test_launch.py's)
    _kill_at_each_then_finish(tmp_path, 2, ["checkpoint_write", "evaluation", "after_epoch_boundary"])
