"""The served deployments on a real `prefect server`: schedules, parameters, the train concurrency limit, and a run
triggered through the API that executes the finetune flow to Completed and publishes its report artifact."""

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
