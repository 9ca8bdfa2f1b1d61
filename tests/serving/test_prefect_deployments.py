"""The served deployments on a real `prefect server`: schedules, parameters, the train concurrency limit, a run
triggered through the API that executes the finetune flow to Completed and publishes its report artifact, and a
run of finetune/sweep whose sweep overrides run three trials, two at a time under the sweep's concurrency limit."""

from __future__ import annotations

import pytest

from tests.serving.runs import MODEL_NAME, TRAIN_LIMIT

pytestmark = pytest.mark.integration


def test_deployments_are_registered_with_schedule_and_overrides(served_client) -> None:
    nightly = served_client.read_deployment_by_name("finetune/nightly-glue")
    default = served_client.read_deployment_by_name("finetune/default")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC" and nightly.schedules[0].active
    assert nightly.parameters == {"overrides": ["task=glue"]}
    assert nightly.entrypoint == "flows/pipeline.py:finetune"
    assert default.schedules == [] and default.parameters == {"overrides": []}
    sweep = served_client.read_deployment_by_name("finetune/sweep")
    assert sweep.schedules == [] and sweep.parameters["overrides"][0] == "-m"
    assert sweep.entrypoint == "flows/pipeline.py:finetune"  # the finetune flow hands sweep overrides to the sweep
    # the parameter schema is the flow's: one list of strings, the Hydra overrides
    assert default.parameter_openapi_schema["properties"]["overrides"]["anyOf"][0]["type"] == "array"


def test_train_concurrency_limit_is_set_by_serve(served_client) -> None:
    limit = served_client.read_concurrency_limit_by_tag("finetune-train")
    assert limit.concurrency_limit == TRAIN_LIMIT


def test_triggered_run_completes_and_publishes_its_report(served, served_client, champion_run, mlflow_server) -> None:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    flow_run = served_client.read_flow_run(champion_run.id)
    task_runs = served_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    artifacts = served_client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["finetune-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
    ))
    assert flow_run.state.is_completed()
    assert flow_run.parameters["overrides"][0] == "task=glue"
    # the train task of this run carried the concurrency tag
    train = [t for t in task_runs if t.name.startswith("train")]
    assert train and "finetune-train" in train[0].tags
    assert len(artifacts) == 1
    report = artifacts[0].data
    assert f"# finetune: {MODEL_NAME} v1" in report
    assert "Aliases: candidate, champion" in report
    assert "| metric | value |" in report and "| validation_accuracy |" in report
    accuracy = float(report.split("| validation_accuracy |")[1].split("|")[0])
    assert accuracy >= 0.9
    assert "/#/runs/" in report  # an http tracking URI gives a link to the MLflow UI
    # its overrides name no paths.root: the run kept its state under the serve process's --root
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id],
                                filter_string=f"tags.`prefect.flow_run_id` = '{champion_run.id}'", max_results=2)
    assert run.data.params["paths.root"] == str(served.root)
    assert list((served.root / "stages" / "train").glob("train-*/final/model.safetensors"))


SWEEP = ["-m", "trainer.seed=1,2,3", "sweep.max_parallel=2", "sweep.register=none", "task=glue", "task.subset=sst2",
         "model=tiny_bert", "trainer.max_steps=8", "trainer.save_steps=8", "trainer.logging_steps=4",
         "trainer.per_device_train_batch_size=16", "task.max_train_samples=128", "task.max_eval_samples=32",
         "task.max_predict_samples=32"]
"""Three tiny trials, two at a time: trial 0 runs alone (it fills the shared stages' cache), then 1 and 2 together."""


def test_the_sweep_deployment_runs_its_trials_two_at_a_time(served, glue_data, tmp_path) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.deployments import run_deployment

    from tests.serving.conftest import prefect_client
    from tests.sweeps.helpers import sweep_report

    root = tmp_path / "state"
    # MLflow: the default SQLite store under paths.root, written by two trials at once
    overrides = [*SWEEP, f"task.dataset_path={glue_data}", f"paths.root={root}"]
    with prefect_client(served.api_url, served.home) as client:
        flow_run = run_deployment("finetune/sweep", parameters={"overrides": overrides}, timeout=600)
        assert flow_run.state is not None and flow_run.state.is_completed(), (
            f"{flow_run.state}\n{served.log.read_text()[-4000:]}")
        report = sweep_report(root)
        trials = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=f"{report['sweep']}-trial-")))
        limit = client.read_global_concurrency_limit_by_name(report["concurrency_limit"])
    # the deployment's parameter was the sweep: every trial a finetune flow run, nested under this one's sweep
    assert report["counts"] == {"COMPLETE": 3, "PRUNED": 0, "FAILED": 0} and report["registered"] == []
    by_name = {t.name: t for t in trials}
    assert sorted(by_name) == [f"{report['sweep']}-trial-{n:03d}" for n in range(3)]
    assert all(t.state.is_completed() and t.parent_task_run_id for t in trials)
    # the server's record: trial 0 ended before the others began, trials 1 and 2 ran at the same time
    first, second, third = (by_name[f"{report['sweep']}-trial-{n:03d}"] for n in range(3))
    assert first.end_time <= min(second.start_time, third.start_time)
    assert max(second.start_time, third.start_time) < min(second.end_time, third.end_time), [
        (t.name, t.start_time, t.end_time) for t in trials]
    # ... each holding a slot of the sweep's global concurrency limit on the server, all released at the end
    assert report["concurrency_limit"].startswith("finetune-sweep-")
    assert limit.limit == 2 and limit.active_slots == 0


def test_the_sweep_limit_holds_trials_to_its_slots_and_a_new_start_frees_a_killed_runs(prefect_server, tmp_path) -> None:
    from prefect.concurrency.sync import concurrency

    from flows.sweep import plan_sweep, set_trial_limit
    from tests.serving.conftest import prefect_client

    plan = plan_sweep(["-m", "model=tiny_bert", "trainer.seed=1,2", "sweep.max_parallel=1", f"paths.root={tmp_path}"])
    with prefect_client(prefect_server.url, tmp_path / "prefect") as client:
        set_trial_limit(plan)
        # a trial of a run killed with its slot held: the lease outlives the process
        client.increment_concurrency_slots_with_lease([plan.trial_limit], slots=1, mode="concurrency",
                                                      lease_duration=300)
        with pytest.raises(TimeoutError):  # the one slot is taken: the next trial waits
            with concurrency(plan.trial_limit, timeout_seconds=3, strict=True):
                pass
        set_trial_limit(plan)  # the sweep started again
        with concurrency(plan.trial_limit, timeout_seconds=10, strict=True):
            assert client.read_global_concurrency_limit_by_name(plan.trial_limit).active_slots == 1
        assert client.read_global_concurrency_limit_by_name(plan.trial_limit).limit == 1
