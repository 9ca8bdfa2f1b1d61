"""The ranks' side of pruning a sweep trial: relay evaluations out, stop when the sweep asks.

flows/sweep.py adds this callback to an Optuna trial's trainer config:

    trainer.callbacks=[{_target_:flows.pruning.PruneOnRequest,control_dir:'<root>/sweeps/<study>/trial-0003'}]

The main process appends every evaluation to <control_dir>/evaluations.jsonl and waits until the sweep has
judged it: the sweep reports it to Optuna and writes either <control_dir>/prune (the pruner says stop) or the
step to <control_dir>/judged. So a trial is pruned at the step after the evaluation that condemned it, whatever
the sweep's polling: every rank stops together there (the main process's answer is broadcast), training ends as
at max_steps and the trial's flow finishes normally. Imported inside the ranks: no prefect, optuna or mlflow here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trainer_core.callbacks import TrainerCallback

EVALUATIONS = "evaluations.jsonl"
PRUNE = "prune"
JUDGED = "judged"
VERDICT_WAIT_SECONDS = 60.0
"""How long the main process waits for the sweep's verdict on an evaluation: a sweep that stopped answering
does not hold the ranks (the trial then trains on, unpruned)."""


class PruneOnRequest(TrainerCallback):
    def __init__(self, control_dir: str):
        self.control_dir = Path(control_dir)

    def on_evaluate(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs: Any):
        if state.is_world_process_zero and metrics:
            self.control_dir.mkdir(parents=True, exist_ok=True)
            with open(self.control_dir / EVALUATIONS, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "metrics": metrics}) + "\n")
            self._await_verdict(state.global_step)
        return control

    def _await_verdict(self, step: int) -> None:
        deadline = time.monotonic() + VERDICT_WAIT_SECONDS
        while time.monotonic() < deadline:
            if (self.control_dir / PRUNE).exists() or judged_step(self.control_dir) >= step:
                return
            time.sleep(0.05)

    def on_step_end(self, args, state, control, **kwargs: Any):
        if self._prune_requested(state):
            control.should_training_stop = True
        return control

    def _prune_requested(self, state) -> bool:
        requested = state.is_world_process_zero and (self.control_dir / PRUNE).exists()
        from accelerate import PartialState

        if PartialState().num_processes > 1:
            # the file may appear between two ranks' checks: all follow the main process, or they'd part ways
            from accelerate.utils import broadcast_object_list

            flag = [requested]
            broadcast_object_list(flag, from_process=0)
            requested = bool(flag[0])
        return requested


def judged_step(control_dir: Path) -> int:
    """The last step whose evaluation the sweep has judged; -1 before the first."""
    try:
        return int((control_dir / JUDGED).read_text())
    except (OSError, ValueError):
        return -1
