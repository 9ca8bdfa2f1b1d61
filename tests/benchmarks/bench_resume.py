"""Benchmark: resume cost at an early and a late step must be the same (O(1) in the step).

    .venv/bin/python tests/benchmarks/bench_resume.py               # late step 990 of a 1000-step run
    .venv/bin/python tests/benchmarks/bench_resume.py --late 1990 --steps 2000

One real run of a tiny BERT trains all the steps (a 4-sample dataset, so the plan has hundreds of epochs; every
step logged, so metrics.jsonl and the trainer state's log history are as long as they get) and saves a
checkpoint at the early and at the late step. Then, repeatedly and alternating, a fresh Trainer resumes from
each (into a copy of the run's metrics.jsonl, as a relaunch would find it) and we time what a resume costs:
`setup()` (optimizer, scheduler, load + verify the checkpoint, truncate metrics.jsonl, position the sampler
in the batch plan) plus fetching the first resumed batch. Prints both medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("WORLD_SIZE", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer_core.factories import make_trainer  # noqa: E402
from trainer_core import checkpoint as ckpt  # noqa: E402
from trainer_core.callbacks import TrainerCallback  # noqa: E402


class SaveAt(TrainerCallback):
    """Checkpoint only at the given steps (save_strategy=no otherwise)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control


def _args(steps: int) -> dict:
    return dict(train_n=4, eval_n=4, per_device_train_batch_size=2, max_steps=steps, logging_steps=1,
                save_strategy="no", dropout=0.1, shuffle=True, disable_tqdm=True, log_level="warning")


def build_run(root: Path, early: int, late: int, steps: int) -> float:
    """Train `steps` steps for real with checkpoints at `early` and `late`; returns the training time."""
    started = time.perf_counter()
    trainer = make_trainer(root / "run", callback_objects=[SaveAt([early, late])], **_args(steps))
    trainer.train()
    trainer.cleanup()
    return time.perf_counter() - started


def time_resume(root: Path, step: int, steps: int, attempt: int) -> float:
    run = root / "run"
    out = root / f"resume-{step}-{attempt}"
    out.mkdir()
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")  # what a relaunch finds: every logged step
    trainer = make_trainer(out, resume_from_checkpoint=str(ckpt.checkpoint_dir(run, step)), **_args(steps))
    started = time.perf_counter()
    trainer.setup()
    next(iter(trainer._train_loader))  # the first batch of the resumed step
    elapsed = time.perf_counter() - started
    assert trainer.state.global_step == step, trainer.state.global_step
    trainer.cleanup()
    return elapsed


def measure(root: Path, early: int = 10, late: int = 990, steps: int = 1000, repeats: int = 5) -> dict:
    training = build_run(root, early, late, steps)
    times: dict[int, list[float]] = {early: [], late: []}
    for attempt in range(repeats):
        for step in (early, late) if attempt % 2 == 0 else (late, early):
            times[step].append(time_resume(root, step, steps, attempt))
    return {"training_s": training, "early_step": early, "late_step": late,
            "early_s": statistics.median(times[early]), "late_s": statistics.median(times[late]), "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--late", type=int, default=990)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), cli.early, cli.late, cli.steps, cli.repeats)
    print(f"built the run: {cli.steps} steps in {result['training_s']:.1f} s")
    print(f"resume at step {result['early_step']:>5}: {result['early_s'] * 1000:8.1f} ms (median of {cli.repeats})")
    print(f"resume at step {result['late_step']:>5}: {result['late_s'] * 1000:8.1f} ms (median of {cli.repeats})")
    print(f"late / early: {result['late_s'] / result['early_s']:.2f}")


if __name__ == "__main__":
    main()
