"""The ranks' side of pruning a sweep trial: relay evaluations out, stop when the sweep asks.

flows/sweep.py adds this callback to an Optuna trial's trainer config:

    trainer.callbacks=[{_target_:flows.pruning.PruneOnRequest,control_dir:'<root>/sweeps/<study>/trial-0003'}]

The main process appends every evaluation to <control_dir>/evaluations.jsonl; the sweep reports them to Optuna
and, once the pruner says so, writes <control_dir>/prune. At the next step every rank stops together (the main
process's answer is broadcast), training ends as at max_steps and the trial's flow finishes normally. Imported
inside the ranks: no prefect, optuna or mlflow here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_core.callbacks import TrainerCallback

EVALUATIONS = "evaluations.jsonl"
PRUNE = "prune"


class PruneOnRequest(TrainerCallback):
    def __init__(self, control_dir: str):
        self.control_dir = Path(control_dir)

    def on_evaluate(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs: Any):
        if state.is_world_process_zero and metrics:
            self.control_dir.mkdir(parents=True, exist_ok=True)
            with open(self.control_dir / EVALUATIONS, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "metrics": metrics}) + "\n")
        return control

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
