"""A callback that parks a rank at a chosen point of the loop so that the *test* can SIGKILL it there.

Configured through the run's `args.callbacks` (`{_target_: tests.fault_tolerance.killpoints.KillPoint}`) and
switched on by the environment, so the reference run, the killed run and the relaunch share one spec:

    FT_KILL_AT=<point>:<step>   point: step_end | substep | epoch_begin | save | eval
    FT_KILL_ONCE=<path>         park only if this file does not exist yet (it is created when parking)
    FT_PAUSE=<seconds>          how long to park (default 120; the test kills long before)

When parked it prints `FT-MARK <point> <step> pid=<pid>` on stdout and sleeps: nothing is raised inside the
loop, the process dies only from the test's SIGKILL.
  step_end     after optimizer step <step> (mid-epoch when <step> is not an epoch's last)
  substep      between two micro-batches of the accumulation window of step <step>+1
  epoch_begin  at the start of the epoch that begins after step <step> (right after an epoch boundary)
  save         inside the save of checkpoint <step>: every file written to .tmp-step-*, no manifest yet
  eval         inside the evaluation at step <step>, after its first batch
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainer_core.callbacks import TrainerCallback

MARK = "FT-MARK"


class KillPoint(TrainerCallback):
    def __init__(self) -> None:
        spec = os.environ.get("FT_KILL_AT", "")
        self.point, _, step = spec.partition(":")
        self.step = int(step) if step else -1
        if self.point == "save":
            self._patch_commit()
        elif self.point == "eval":
            self._patch_eval()

    def _park(self) -> None:
        once = os.environ.get("FT_KILL_ONCE")
        if once:
            if Path(once).exists():
                return
            Path(once).write_text(f"{os.getpid()} {os.getpgid(0)}\n")
        print(f"{MARK} {self.point} {self.step} pid={os.getpid()}", flush=True)
        sys.stdout.flush()
        time.sleep(float(os.environ.get("FT_PAUSE", "120")))

    def _maybe(self, point: str, global_step: int) -> None:
        if self.point == point and global_step == self.step:
            self._park()

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe("step_end", state.global_step)

    def on_substep_end(self, args, state, control, **kwargs):
        self._maybe("substep", state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._maybe("epoch_begin", state.global_step)

    def _patch_commit(self) -> None:
        from trainer_core import checkpoint

        real = checkpoint.commit

        def commit(tmp, *, global_step, **kwargs):
            self._maybe("save", global_step)
            return real(tmp, global_step=global_step, **kwargs)

        checkpoint.commit = commit

    def _patch_eval(self) -> None:
        from trainer_core.trainer import Trainer

        real = Trainer._eval_dataloader
        point = self

        def eval_dataloader(trainer, dataset):
            loader = real(trainer, dataset)

            def batches():
                for i, batch in enumerate(loader):
                    yield batch
                    if i == 0 and getattr(trainer, "_is_setup", False):
                        point._maybe("eval", trainer.state.global_step)

            return batches()

        Trainer._eval_dataloader = eval_dataloader
