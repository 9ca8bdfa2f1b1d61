"""Callbacks with the events of transformers.Trainer, and the state they see.

Where each event fires in `Trainer.train`:

    on_init_end                     end of Trainer.__init__
    on_train_begin                  after setup and resume, before the first step
    for each optimizer step:
        on_epoch_begin              first step of an epoch (or the first step after a resume)
        on_step_begin               before the step's first micro-batch
        for each micro-batch:
            forward, backward
            on_substep_end          after a micro-batch that did not step the optimizer
        clip, optimizer.step, scheduler.step, zero_grad; global_step += 1
        on_step_end                 -> control decides log / evaluate / save / stop
        log (on_log), evaluate (on_evaluate), save (on_save)
        on_epoch_end                last step of an epoch (or when training stops)
        log (on_log), evaluate (on_evaluate), save (on_save)
    on_train_end                    after the loop (best model loaded, before final/ is written)
    on_predict                      end of Trainer.predict

Callbacks from config: `trainer.callbacks: [{_target_: my_pkg.MyCallback, patience: 3}]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_core.args import TrainingArguments
from trainer_core.files import fsync_dir
from trainer_core.metrics import is_better


@dataclass
class TrainerState:
    """What the loop knows; saved as trainer_state.json in every checkpoint."""

    global_step: int = 0
    """Optimizer steps done; also the data cursor (the next step reads the plan's rows of step global_step)."""
    epoch: float = 0.0
    max_steps: int = 0
    num_train_epochs: int = 0
    logging_steps: int = 0
    eval_steps: int = 0
    save_steps: int = 0
    train_batch_size: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    train_loss_sum: float = 0.0
    """Sum of the per-step losses so far, so that training_loss survives a resume."""
    window_loss_sum: float = 0.0
    """Sum of the step losses since the last log (a resumed run logs the same mean)."""
    last_logged_step: int = 0
    """Step of the last training log, moved on past steps an epoch cut skipped (the window mean is per trained step)."""
    skipped_steps: int = 0
    """Steps skipped by should_epoch_stop: counted in global_step (the plan cursor), not trained."""
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    stateful_callbacks: dict[str, Any] = field(default_factory=dict)
    """Callback class name -> its state_dict() (early-stopping counters, ...)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class TrainerControl:
    """Flags callbacks set to steer the loop; the loop resets them once acted on."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False


class TrainerCallback:
    """Override the events you need; each gets (args, state, control, **kwargs) and may return a new control."""

    def on_init_end(self, args, state, control, **kwargs): ...
    def on_train_begin(self, args, state, control, **kwargs): ...
    def on_train_end(self, args, state, control, **kwargs): ...
    def on_epoch_begin(self, args, state, control, **kwargs): ...
    def on_epoch_end(self, args, state, control, **kwargs): ...
    def on_step_begin(self, args, state, control, **kwargs): ...
    def on_substep_end(self, args, state, control, **kwargs): ...
    def on_step_end(self, args, state, control, **kwargs): ...
    def on_evaluate(self, args, state, control, **kwargs): ...
    def on_predict(self, args, state, control, **kwargs): ...
    def on_save(self, args, state, control, **kwargs): ...
    def on_log(self, args, state, control, **kwargs): ...


class CallbackHandler(TrainerCallback):
    """Calls every callback in order for each event."""

    EVENTS = (
        "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
        "on_substep_end", "on_step_end", "on_evaluate", "on_predict", "on_save", "on_log",
    )

    def __init__(self, callbacks: list[TrainerCallback]):
        self.callbacks = list(callbacks)

    def add(self, callback: TrainerCallback) -> None:
        self.callbacks.append(callback)

    def fire(self, event: str, args: TrainingArguments, state: TrainerState, control: TrainerControl,
             **kwargs: Any) -> TrainerControl:
        for callback in self.callbacks:
            result = getattr(callback, event)(args, state, control, **kwargs)
            if result is not None:
                control = result
        return control

    def stateful(self) -> list[TrainerCallback]:
        return [cb for cb in self.callbacks if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")]


class DefaultFlowCallback(TrainerCallback):
    """Decides log / evaluate / save from the strategies, like transformers' DefaultFlowCallback."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if state.global_step % args.logging_steps == 0:
            control.should_log = True
        if args.eval_strategy == "steps" and state.global_step % args.resolved_eval_steps() == 0:
            control.should_evaluate = True
        if args.save_strategy == "steps" and state.global_step % args.save_steps == 0:
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            # as transformers 5: a steps strategy also evaluates the last step (once), so the final checkpoint
            # has a metric and can be the best one
            if args.eval_strategy == "steps" and state.global_step % args.resolved_eval_steps() != 0:
                control.should_evaluate = True
            # the last step is always saved under a steps strategy, so a finished run can be resumed/inspected
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.eval_strategy == "epoch":
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control


class EarlyStoppingCallback(TrainerCallback):
    """Stop after `patience` evaluations in a row that do not improve on the best metric so far (state.best_metric,
    which the Trainer updates after each evaluation on any improvement) by more than `threshold`: transformers'
    EarlyStoppingCallback (early_stopping_patience, early_stopping_threshold)."""

    def __init__(self, patience: int = 1, threshold: float = 0.0):
        self.patience, self.threshold = patience, threshold
        self.patience_counter = 0

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs):
        value = (metrics or {}).get(args.best_metric_key())
        if value is None:
            return control
        # fired before the Trainer updates state.best_metric with this evaluation, as in transformers
        if is_better(value, state.best_metric, args.resolved_greater_is_better(), self.threshold):
            self.patience_counter = 0
        else:
            self.patience_counter += 1
        if self.patience_counter >= self.patience:
            control.should_training_stop = True
        return control

    def state_dict(self) -> dict[str, Any]:
        return {"patience_counter": self.patience_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience_counter = state["patience_counter"]  # older checkpoints also hold a "best": unused


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps, on the main process only."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.set_postfix({k: float(f"{v:.4g}") for k, v in logs.items() if isinstance(v, float)}, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFileCallback(TrainerCallback):
    """Appends every on_log record to <output_dir>/metrics.jsonl (main process only).

    One line per record: {"step": global_step, "epoch": epoch, "metrics": {...}}. The file is fsynced before
    each checkpoint commits (`sync`), and `truncate_to(step)` drops what a killed run logged after the
    checkpoint it resumes from, so no step is logged twice.
    """

    def __init__(self, output_dir: str | Path, is_main_process: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.is_main_process = is_main_process
        self._file = None

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main_process or not logs:
            return
        metrics = {k: v for k, v in logs.items() if k != "epoch"}
        record = {"step": state.global_step, "epoch": state.epoch, "metrics": metrics}
        f = self._open()
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()

    def sync(self) -> None:
        """Flush and fsync: called before a checkpoint commits, so the file holds every step it covers."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def truncate_to(self, step: int) -> None:
        """Keep only the lines with step <= `step`, rewriting the file atomically (temp file + rename)."""
        if not self.is_main_process or not self.path.exists():
            return
        self.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by the kill
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics-", suffix=".jsonl")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, args, state, control, **kwargs):
        self.sync()
        self.close()
