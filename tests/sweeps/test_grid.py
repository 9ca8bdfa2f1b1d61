"""A 2 x 2 grid on tiny_bert as a user runs it: `python -m flows.finetune -m ...`.

The grid crosses a sane and a diverging learning rate with the divergence guard on and off: the guarded diverging
trial fails (the train stage's guard), the unguarded one trains on to the end (like the HF Trainer), so the sweep
ends with 3 completed trials and 1 failed, and says so in its exit code. Run once per module and shared by the
assertions; then the identical grid runs again and is served from the cache. Two trials at a time
(sweep.max_parallel=2): the first alone (it fills the shared stages' cache), then the other three two by two.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.sweeps.helpers import TINY_TRIAL, mlflow_runs, prefect_artifact, prefect_flow_runs, sweep_report

pytestmark = pytest.mark.integration
GRID = ["-m", "trainer.learning_rate=1e-3,1e6", "trainer.stop_on_nonfinite=true,false", "sweep.max_parallel=2"]
FAILING = ["trainer.learning_rate=1000000.0", "trainer.stop_on_nonfinite=True"]  # as Hydra lists the values


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("grid") / "state"


@pytest.fixture(scope="module")
def first(run_cli, root):
    return run_cli([*GRID, *TINY_TRIAL, f"paths.root={root}"], timeout=900)


@pytest.fixture(scope="module")
def again(run_cli, root, first):
    return run_cli([*GRID, *TINY_TRIAL, f"paths.root={root}"], timeout=900)


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(first, root) -> None:
    output = first.stdout + first.stderr
    assert first.returncode == 3, output[-4000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the sweep completed with failures: 1 of 4 trials failed (exit code 3)"], output[-4000:]
    report = sweep_report(root)
    assert report["counts"] == {"COMPLETE": 3, "PRUNED": 0, "FAILED": 1}
    (failed,) = [t for t in report["trials"] if t["state"] == "FAILED"]
    assert failed["own"] == FAILING and "training diverged" in failed["error"]
    assert [t["state"] for t in report["trials"]][-1] == "FAILED"  # ranked last


def test_four_child_runs_nest_under_one_parent_run(first, root) -> None:
    runs = mlflow_runs(root)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert sorted(r.data.tags["sweep.trial"] for r in children) == ["0", "1", "2", "3"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.space.trainer.learning_rate"] == "0.001,1000000.0"
    # Prefect: one finetune-sweep flow run, each trial a finetune child flow run under it
    flow_runs = prefect_flow_runs(root)
    (sweep_run,) = [f for f in flow_runs if f["flow"] == "finetune-sweep"]
    trials = [f for f in flow_runs if f["flow"] == "finetune"]
    assert len(trials) == 4 and all(f["parent_flow_run_id"] == sweep_run["id"] for f in trials)
    assert sorted(f["state"] for f in trials) == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"]
    # two at a time, as the server recorded them: trial 0 alone, then 1 and 2 together, 3 once a slot was free
    times = {int(f["name"].rsplit("-", 1)[1]): (datetime.fromisoformat(f["start_time"]),
                                                datetime.fromisoformat(f["end_time"])) for f in trials}
    assert times[0][1] <= min(times[1][0], times[2][0])
    assert max(times[1][0], times[2][0]) < min(times[1][1], times[2][1]), times
    assert times[3][0] >= min(times[1][1], times[2][1]), times


def test_tokenization_ran_once(first, root) -> None:
    output = first.stdout + first.stderr
    assert output.count("prepare_data: cache miss") == 1
    stages = [t["stages"] for t in sweep_report(root)["trials"] if t["state"] == "COMPLETE"]
    assert sorted(s["prepare_data"] for s in stages) == ["cached", "cached", "ran"]


def test_the_best_trial_is_registered_and_reported(first, root) -> None:
    from mlflow import MlflowClient

    report = sweep_report(root)
    completed = [t for t in report["trials"] if t["state"] == "COMPLETE"]
    best = report["best"]
    assert best["value"] == max(t["value"] for t in completed) and completed[0]["number"] == best["number"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (version,) = client.search_model_versions("")
    assert version.run_id == best["mlflow_run_id"]
    assert report["registered"] == [{"trial": best["number"], "model_name": version.name,
                                     "model_version": str(version.version), "aliases": report["registered"][0]["aliases"]}]
    assert "candidate" in report["registered"][0]["aliases"]
    (parent,) = [r for r in mlflow_runs(root) if r.data.tags.get("sweep.role") == "parent"]
    assert parent.data.tags["sweep.best_trial"] == str(best["number"])
    assert parent.data.metrics["best_validation_accuracy"] == pytest.approx(best["value"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/trials.md", "sweep/metric_vs_params.png"}
    # the Prefect artifact: the trials as a markdown table, best first
    markdown = prefect_artifact(root, "finetune-sweep-report")
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [int(row.split("|")[2]) for row in rows] == [t["number"] for t in report["trials"]]
    assert f"Best: trial {best['number']}" in markdown
    assert f"Best: trial {best['number']}" in first.stdout


def test_the_identical_grid_again_is_served_from_the_cache(again, root) -> None:
    from mlflow import MlflowClient

    output = again.stdout + again.stderr
    assert again.returncode == 3, output[-4000:]
    report = sweep_report(root)
    assert report["counts"] == {"COMPLETE": 3, "PRUNED": 0, "FAILED": 1}
    for trial in report["trials"]:
        if trial["state"] == "COMPLETE":
            assert set(trial["stages"].values()) == {"cached"}, trial
    assert "prepare_data: cache miss" not in output and "register: cache miss" not in output
    assert len(MlflowClient(f"sqlite:///{root}/mlflow.db").search_model_versions("")) == 1
