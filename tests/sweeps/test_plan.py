"""Sweeps before they run (flows/sweep.py): Hydra's override grammar expanded, bad input refused in one message,
Optuna's side (search space, resume, pruning) on a real journal storage. No trial runs here."""

from __future__ import annotations

import json
import logging

import pytest

from flows.sweep import (
    SweepPlan,
    Trial,
    _distributions,
    _hydra_literal,
    _PruneWatcher,
    _resume,
    best_trial,
    is_sweep,
    open_study,
    plan_sweep,
    ranked,
)
from stages.schema import ConfigError

TINY = ["model=tiny_bert"]


def test_a_grid_is_every_combination_of_lists_and_ranges() -> None:
    plan = plan_sweep(["-m", *TINY, "trainer.learning_rate=1e-5,3e-5", "trainer.seed=range(1,4)", "sweep.max_parallel=2"])
    assert plan.fixed == TINY  # sweep.* configures the sweep, not the trials
    assert plan.grid() == [[f"trainer.learning_rate={lr}", f"trainer.seed={s}"] for lr in ("1e-05", "3e-05")
                           for s in (1, 2, 3)]
    assert plan.metric == "validation_accuracy" and plan.higher_is_better
    assert plan.base.sweep.max_parallel == 2


def test_the_sweep_name_is_its_definition() -> None:
    a = plan_sweep(["-m", *TINY, "trainer.seed=1,2"])
    assert plan_sweep(["-m", *TINY, "trainer.seed=1,2", "sweep.max_parallel=2"]).name == a.name
    assert plan_sweep(["-m", *TINY, "trainer.seed=1,3"]).name != a.name
    assert plan_sweep(["-m", *TINY, "trainer.seed=1,2", "sweep.study_name=mine"]).name == "mine"


@pytest.mark.parametrize("argv, routed", [
    (["-m", "trainer.seed=1,2"], True),
    (["trainer.seed=1", "--multirun"], True),
    (["sweep.search=optuna", "trainer.learning_rate=interval(1e-5,1e-3)"], True),
    (["sweep.search=grid", "trainer.seed=1"], False),
    (["trainer.seed=1"], False),
])
def test_is_sweep(argv, routed) -> None:
    assert is_sweep(argv) is routed


@pytest.mark.parametrize("argv, message", [
    (["-m", "trainer.learning_rat=1e-5,3e-5"], "Key 'learning_rat' not in 'TrainingArguments'"),
    (["-m", "trainer.seed=range(3,3)"], "trainer.seed=range(3,3): the search space has no values"),
    (["-m", "trainer.seed=1"], "The search space is empty"),
    (["sweep.search=optuna", "trainer.learning_rate=interval(1e-3,1e-5)"], "the search space has no values"),
    (["sweep.search=optuna", "sweep.n_trials=0", "trainer.learning_rate=interval(1e-5,1e-3)"],
     "sweep.n_trials=0: a search needs at least one trial"),
    (["-m", "registry.champion_metric=bleu", "trainer.seed=1,2"],
     "registry.champion_metric='bleu': the task produces accuracy, f1"),
    (["-m", "trainer.seed=1,2", "registry.champion_metric=accuracy,bleu"], "registry.champion_metric='bleu'"),
    (["-m", "trainer.learning_rate=interval(1e-5,1e-3)"], "interval() is a continuous range, which a grid cannot list"),
    (["-m", "sweep.max_parallel=1,2", "trainer.seed=1,2"], "sweep.max_parallel=1,2: the sweep.* keys configure"),
    (["-m", "trainer.learning_rate=1e-3,-1"], "sweep trial trainer.learning_rate=-1: "),
    (["-m", "trainer.seed=1,2", "sweep.study_name=lr/1"], "sweep.study_name='lr/1': use letters, digits"),
])
def test_bad_input_is_one_message_naming_the_key(argv, message) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_sweep([*TINY, *argv])
    assert message in str(caught.value)


def test_bad_input_on_the_command_line_exits_2_before_any_trial(run_cli, tmp_path) -> None:
    root = tmp_path / "state"
    done = run_cli(["-m", *TINY, "trainer.seed=range(3,3)", f"paths.root={root}"], timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["error: trainer.seed=range(3,3): the search space has no values; "
                                                "give at least one value."]
    assert not root.exists()


def test_a_search_space_in_optuna_terms() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    plan = plan_sweep([*TINY, "sweep.search=optuna", "trainer.learning_rate=tag(log,interval(1e-5,1e-3))",
                       "trainer.warmup_steps=interval(0,0.2)", "trainer.seed=range(1,4)",
                       "trainer.gradient_accumulation_steps=tag(int,interval(1,4))"])
    assert _distributions(plan) == {
        "trainer.learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
        "trainer.warmup_steps": FloatDistribution(0.0, 0.2),
        "trainer.seed": CategoricalDistribution(["1", "2", "3"]),
        "trainer.gradient_accumulation_steps": IntDistribution(1, 4),
    }


def test_the_prune_callback_composes_into_the_trainer_config(tmp_path) -> None:
    from flows.config import compose

    callbacks = [{"_target_": "flows.pruning.PruneOnRequest", "control_dir": str(tmp_path / "it's here")}]
    cfg = compose([*TINY, f"trainer.callbacks={_hydra_literal(callbacks)}"])
    assert cfg.trainer.callbacks == callbacks


def _plan(tmp_path, *extra: str) -> SweepPlan:
    return plan_sweep([*TINY, f"paths.root={tmp_path}", "sweep.search=optuna", "sweep.pruner_startup_trials=1",
                       "trainer.learning_rate=interval(1e-5,1e-3)", *extra])


def test_a_resumed_study_keeps_its_finished_trials_and_reruns_the_interrupted_one(tmp_path) -> None:
    plan = _plan(tmp_path)
    study = open_study(plan)
    distributions = _distributions(plan)
    study.tell(study.ask(distributions), 0.6)
    interrupted = study.ask(distributions)  # the sweep was killed while this one trained
    again = open_study(plan)  # a new process
    assert _resume(again, logging.getLogger("test")) == 1
    states = [t.state.name for t in again.get_trials(deepcopy=False)]
    assert states == ["COMPLETE", "FAIL", "WAITING"]
    assert again.ask(distributions).params == interrupted.params
    assert _resume(open_study(plan), logging.getLogger("test")) == 1  # its rerun running now: closed, queued once
    assert [t.state.name for t in open_study(plan).get_trials(deepcopy=False)] == ["COMPLETE", "FAIL", "FAIL", "WAITING"]


def test_a_weak_trial_is_asked_to_stop(tmp_path) -> None:
    from flows.pruning import PRUNE, judged_step

    plan = _plan(tmp_path)
    study = open_study(plan)
    distributions = _distributions(plan)
    strong = study.ask(distributions)
    for step, value in ((4, 0.6), (8, 0.7)):
        strong.report(value, step)
    study.tell(strong, 0.7)
    weak = study.ask(distributions)
    control = tmp_path / "trial-0001"
    watcher = _PruneWatcher(weak, control, "eval_accuracy")
    watcher.start()
    with open(control / "evaluations.jsonl", "a") as f:  # what flows.pruning.PruneOnRequest writes
        f.write(json.dumps({"step": 4, "metrics": {"eval_loss": 0.7, "eval_accuracy": 0.65}}) + "\n")
    assert not watcher.stop() and not (control / PRUNE).exists()  # better than the median at step 4
    assert judged_step(control) == 4  # judged: the trial's main process, waiting for the verdict, goes on
    watcher = _PruneWatcher(weak, control, "eval_accuracy")  # e.g. a relaunch: a fresh file, the same trial
    watcher.start()
    with open(control / "evaluations.jsonl", "a") as f:
        f.write(json.dumps({"step": 8, "metrics": {"eval_accuracy": 0.5}}) + "\n")
    # the best value so far (0.65) is below the median at step 8 (0.7)
    assert watcher.stop() and (control / PRUNE).read_text().startswith("pruned at step 8")


def test_the_prune_callback_relays_evaluations_and_stops_when_asked(tmp_path, monkeypatch) -> None:
    import threading

    from flows import pruning
    from trainer_core.callbacks import TrainerControl, TrainerState

    callback = pruning.PruneOnRequest(str(tmp_path))
    state, control = TrainerState(global_step=4), TrainerControl()
    # the main process waits for the sweep's verdict on its evaluation before it trains on
    waiting = threading.Thread(target=callback.on_evaluate, args=(None, state, control),
                               kwargs={"metrics": {"eval_accuracy": 0.5}})
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()
    assert json.loads((tmp_path / "evaluations.jsonl").read_text()) == {"step": 4, "metrics": {"eval_accuracy": 0.5}}
    (tmp_path / pruning.JUDGED).write_text("4\n")  # what the sweep's watcher writes: judged, not pruned
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert not callback.on_step_end(None, state, control).should_training_stop
    (tmp_path / "prune").write_text("pruned\n")
    assert callback.on_step_end(None, state, control).should_training_stop

    # a sweep that stopped answering does not hold the ranks for ever
    monkeypatch.setattr(pruning, "VERDICT_WAIT_SECONDS", 0.2)
    (tmp_path / "prune").unlink()
    callback.on_evaluate(None, TrainerState(global_step=8), control, metrics={"eval_accuracy": 0.5})
    assert pruning.judged_step(tmp_path) == 4


def test_the_best_trial_and_the_ranking() -> None:
    trials = [Trial(0, [], {}, "COMPLETE", 0.5), Trial(1, [], {}, "FAILED"), Trial(2, [], {}, "COMPLETE", 0.7),
              Trial(3, [], {}, "PRUNED"), Trial(4, [], {}, "COMPLETE", 0.7)]
    assert best_trial(trials, higher_is_better=True).number == 2  # ties: the first
    assert best_trial(trials, higher_is_better=False).number == 0
    assert [t.number for t in ranked(trials, higher_is_better=True)] == [2, 4, 0, 3, 1]
    assert best_trial([Trial(0, [], {}, "FAILED")], higher_is_better=True) is None


def test_the_pool_runs_max_parallel_trials_at_a_time() -> None:
    import threading
    import time

    from flows.sweep import _Pool

    running, peak, lock = [0], [0], threading.Lock()

    def trial(number: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return number

    pool, done = _Pool(2), []
    for number in range(5):
        pool.submit(trial, number)
        done += pool.wait()
    done += pool.close()
    assert sorted(done) == [0, 1, 2, 3, 4] and peak[0] == 2
