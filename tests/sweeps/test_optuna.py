"""An Optuna sweep of 6 trials with pruning, killed half way (3 trials finished) and run again: it resumes.

The search space holds a sane and a diverging learning rate, with the divergence guard off: a diverging trial
trains on with garbage weights, its evaluations fall below the median of the finished trials, and the median
pruner stops it (its ranks stop at the next step: it trains fewer than max_steps). The sampler's seed makes the
first trial the sane one (the pruner's baseline), the next two diverging ones (pruned before the kill), and the
resumed sweep's trials one sane and two diverging, whether the kill comes before or after the fourth trial was
asked. Pruned trials stop after 5 steps, so 4 of the 6 trials are cheap. One study, two invocations, shared by
the assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline.helpers import REPO
from tests.sweeps.helpers import TINY_TRIAL, mlflow_runs, sweep_report

pytestmark = pytest.mark.integration
MAX_STEPS = 16
N_TRIALS = 6
KILL_AFTER = 3
"""Trials finished (completed or pruned) when the first invocation is killed."""
SEARCH = [
    "sweep.search=optuna", f"sweep.n_trials={N_TRIALS}", "sweep.study_name=pruning", "sweep.seed=11",
    "sweep.pruner=median", "sweep.pruner_startup_trials=1",
    "trainer.learning_rate=choice(1e-3,1e6)", "trainer.stop_on_nonfinite=false",
    "trainer.eval_strategy=steps", "trainer.eval_steps=4",
    *[o for o in TINY_TRIAL if not o.startswith(("trainer.max_steps", "trainer.save_steps"))],
    f"trainer.max_steps={MAX_STEPS}", f"trainer.save_steps={MAX_STEPS}",
]


def _study(root: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(root / "sweeps" / "optuna.journal")))
    return optuna.load_study(study_name="pruning", storage=storage)


def _finished(root: Path) -> int:
    try:
        return sum(t.state.name in ("COMPLETE", "PRUNED") for t in _study(root).get_trials(deepcopy=False))
    except (KeyError, FileNotFoundError, OSError):
        return 0  # not created yet


def _kill_ranks(root: Path) -> None:
    """The trial's `accelerate launch` runs in its own session: stop it too (only if it is still ours)."""
    for pid_file in root.glob("stages/train/*/launcher.pid"):
        pid = int(pid_file.read_text())
        try:
            if str(root) in Path(f"/proc/{pid}/cmdline").read_text():
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("optuna") / "state"


@pytest.fixture(scope="module")
def killed(root):
    """The sweep, killed (SIGKILL) as soon as KILL_AFTER trials finished."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.finetune", *SEARCH, f"paths.root={root}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 900
    while proc.poll() is None and _finished(root) < KILL_AFTER and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    _kill_ranks(root)
    output, _ = proc.communicate(timeout=60)
    return proc.returncode, output


@pytest.fixture(scope="module")
def resumed(run_cli, root, killed):
    return run_cli([*SEARCH, f"paths.root={root}"], timeout=900)


def test_the_sweep_was_killed_half_way(killed, root) -> None:
    returncode, output = killed
    assert returncode == -signal.SIGKILL, output[-4000:]
    states = [t.state.name for t in _study(root).get_trials(deepcopy=False)]
    # trial 0 the pruner's baseline, 1 and 2 pruned; the fourth, if asked yet, was still running
    assert states[:KILL_AFTER] == ["COMPLETE", "PRUNED", "PRUNED"] and states[KILL_AFTER:] in ([], ["RUNNING"]), states


def test_resuming_does_not_rerun_finished_trials(resumed, root) -> None:
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert f"resuming, {KILL_AFTER} of {N_TRIALS} trials already finished" in output
    # the finished trials' flows did not run again; three more did (the interrupted trial's values among them)
    ran = sorted(int(n) for n in re.findall(r"Flow run 'pruning-trial-(\d+)'", output))
    assert ran and min(ran) >= KILL_AFTER and len(set(ran)) == N_TRIALS - KILL_AFTER, ran
    report = sweep_report(root)
    assert sum(report["counts"].values()) == N_TRIALS and report["counts"]["FAILED"] == 0
    numbers = sorted(t["number"] for t in report["trials"])
    assert numbers[:KILL_AFTER] == [0, 1, 2] and numbers[KILL_AFTER:] == sorted(set(ran)), numbers
    # one parent run across both invocations; the finished trials' child runs are the ones from before the kill
    runs = mlflow_runs(root)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "FINISHED" and parent.info.run_id == report["mlflow_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_tags = [r.data.tags.get("sweep.trial") for r in children]
    assert all(trial_tags.count(str(n)) == 1 for n in numbers), trial_tags
    assert sorted(r.info.status for r in children).count("FINISHED") == N_TRIALS
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)


def test_a_weak_trial_is_pruned_early_and_not_registered(resumed, root) -> None:
    from mlflow import MlflowClient

    report = sweep_report(root)
    pruned = [t for t in report["trials"] if t["state"] == "PRUNED"]
    assert pruned, report["trials"]
    assert all(t["params"]["trainer.learning_rate"] == "1000000.0" for t in pruned)
    # pruned before and after the kill; the ranks wait for the sweep's verdict on each evaluation, so a trial
    # pruned at step N stops at step N + 1 (at N, its last, if N is the last step): fewer steps than planned
    assert {t["number"] < KILL_AFTER for t in pruned} == {True, False}, pruned
    for trial in pruned:
        verdict = (root / "sweeps" / "pruning" / f"trial-{trial['number']:04d}" / "prune").read_text()
        step = int(verdict.removeprefix("pruned at step ").split()[0])
        assert trial["global_step"] == min(step + 1, MAX_STEPS), (trial, verdict)
    assert any(t["global_step"] < MAX_STEPS for t in pruned), pruned
    completed = [t for t in report["trials"] if t["state"] == "COMPLETE"]
    assert all(t["global_step"] == MAX_STEPS for t in completed), completed
    best = report["best"]
    assert best["state"] == "COMPLETE" and best["params"]["trainer.learning_rate"] == "0.001"
    (version,) = MlflowClient(f"sqlite:///{root}/mlflow.db").search_model_versions("")
    assert version.run_id == best["mlflow_run_id"]
    assert _study(root).direction.name == "MAXIMIZE"  # registry.higher_is_better() for accuracy
