"""The README's team set-up, run for real: a `prefect server`, an `mlflow server` with --artifacts-destination, a
`process` work pool, the finetune flow deployed to it, and two `prefect worker start` processes, each with its own
FINETUNE_PATHS_ROOT (two "machines" that share nothing but the two servers).

A flow run of the deployment starts on worker A; its process tree is SIGKILLed after step 17 (checkpoint 12 READY
on the tracking server), so worker A reports it Crashed; worker A is stopped; `prefect flow-run retry <id>` hands
it to worker B, which runs it to Completed. That is Prefect 3.8's retry of a crashed deployment run: the same flow
run forced back to Scheduled for any worker of the pool (a flow's own `retries` run inside its process, and
neither a worker nor the server retries a run whose process died). Shown:
  - B ran the retry (its log names the flow run; the final weights are in B's paths.root, none in A's);
  - the retry logged to the same MLflow run (one run carries the flow run id's tag), resumed from the tracking
    server's checkpoint (one log line), and no step is logged twice in that run;
  - its final weights are torch.equal to the uninterrupted reference's (the session's `uninterrupted`).

The deployment runs from a snapshot of the source tree (the content key covers the code: an edit in the checkout
between the two attempts would send B to another key). Its own experiment and model name keep it apart from
tests/tracking/test_resume_elsewhere.py, which trains the same thing on the same server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.tracking import FLOW_RUN_TAG
from tests.fault_tolerance.conftest import assert_same_weights, kill_tree
from tests.fault_tolerance.test_flow_retry import _snapshot
from tests.serving.conftest import _stop, prefect_client
from tests.tracking import kill_scenario as scenario
from tests.tracking.kill_scenario import final_weights, ready_checkpoint, steps, wait_for

pytestmark = pytest.mark.integration
EXPERIMENT = MODEL_NAME = "two-workers"
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _prefect(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _worker(name: str, root: Path, env: dict[str, str], cwd: Path, log: Path, **extra: str) -> subprocess.Popen:
    """One machine: `prefect worker start` with its own FINETUNE_PATHS_ROOT (and Prefect home)."""
    (root / "prefect-home").mkdir(parents=True)
    machine_env = {**env, "FINETUNE_PATHS_ROOT": str(root), "PREFECT_HOME": str(root / "prefect-home"),
                   "PREFECT_WORKER_QUERY_SECONDS": "1", **extra}  # poll every second: the test waits less
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", "finetune", "--name", name], cwd=cwd,
                            env=machine_env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _flow_run_process(worker: subprocess.Popen):
    """The worker's child that executes the flow run (`python -m prefect.engine`)."""
    import psutil

    children = psutil.Process(worker.pid).children(recursive=True)
    return next((p for p in children if "prefect.engine" in " ".join(p.cmdline())), None)


@pytest.fixture(scope="module")
def two_workers(prefect_server, mlflow_server, uninterrupted, tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("two-workers")
    repo = _snapshot(tmp / "repo")
    machine_a, machine_b, once = tmp / "machine-a", tmp / "machine-b", tmp / "parked.once"
    env = {**os.environ, "PREFECT_API_URL": prefect_server.url, "PREFECT_HOME": str(tmp / "cli-home"),
           "COLUMNS": "200"}  # the CLI's tables unwrapped
    env.pop("FINETUNE_PATHS_ROOT", None)
    mlflow_client = MlflowClient(mlflow_server.url)

    # once: the pool, the train concurrency limit, the deployment (README, "A team set-up ...")
    _prefect(["work-pool", "create", "finetune", "--type", "process"], env, repo)
    _prefect(["concurrency-limit", "create", "finetune-train", "2"], env, repo)
    _prefect(["deploy", "flows/pipeline.py:finetune", "--name", "team", "--pool", "finetune"], env, repo)
    workers = {"a": _worker("machine-a", machine_a, env, repo, tmp / "worker-a.log",
                            FT_KILL_AT=scenario.KILL_AT, FT_KILL_ONCE=str(once), FT_PAUSE="300")}
    try:
        overrides = [*scenario.OVERRIDES, f"tracking.uri={mlflow_server.url}",
                     f"tracking.experiment_name={EXPERIMENT}", f"registry.model_name={MODEL_NAME}"]
        out = _prefect(["deployment", "run", "finetune/team", "--param", f"overrides={json.dumps(overrides)}"],
                       env, repo)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        wait_for(lambda: flow_run_id in (tmp / "worker-a.log").read_text(), 120, "worker A to take the flow run")
        workers["b"] = _worker("machine-b", machine_b, env, repo, tmp / "worker-b.log")

        wait_for(once.exists, 600, f"worker A's rank to park after step {scenario.KILL_STEP}")
        first = wait_for(lambda: ready_checkpoint(mlflow_client, scenario.SAVE_STEPS, experiment_names=[EXPERIMENT]),
                         60, "checkpoint 12 to be READY on the server")
        wait_for(lambda: 16 in steps(mlflow_client, first.source_run_id, "loss"), 60, "step 16 in MLflow")
        flow_process = _flow_run_process(workers["a"])
        assert flow_process is not None, (tmp / "worker-a.log").read_text()[-4000:]
        assert kill_tree(flow_process.pid)  # the flow run's process, its Prefect client, its ranks: SIGKILL

        with prefect_client(prefect_server.url, tmp / "cli-home") as client:
            crashed = wait_for(lambda: (s := client.read_flow_run(flow_run_id).state).is_crashed() and s, 60,
                               "worker A to report the flow run Crashed")
        _stop(workers["a"])  # machine A is gone
        _prefect(["flow-run", "retry", flow_run_id], env, repo)
        with prefect_client(prefect_server.url, tmp / "cli-home") as client:
            wait_for(lambda: client.read_flow_run(flow_run_id).state.is_final(), 600, "the retried flow run to finish")
            flow_run = client.read_flow_run(flow_run_id)
    except BaseException:
        for name in workers:
            print(f"--- worker {name}:\n{(tmp / f'worker-{name}.log').read_text()[-6000:]}")
        raise
    finally:
        for worker in workers.values():
            _stop(worker)
    return {"flow_run_id": flow_run_id, "crashed": crashed, "flow_run": flow_run, "first": first,
            "client": mlflow_client,
            "a": machine_a, "b": machine_b, "log_a": (tmp / "worker-a.log").read_text(),
            "log_b": (tmp / "worker-b.log").read_text(), "ref": uninterrupted}


def test_a_retry_on_the_other_worker_reattaches_to_its_run_and_resumes_from_the_server(two_workers):
    flow_run_id, log_b, mlflow_client = two_workers["flow_run_id"], two_workers["log_b"], two_workers["client"]
    flow_run = two_workers["flow_run"]
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{log_b[-6000:]}"
    assert two_workers["crashed"].is_crashed() and flow_run.run_count == 2  # one flow run, run twice
    # worker B ran the retry, on its own paths.root; machine A never finished a training
    assert flow_run_id in log_b and flow_run_id in two_workers["log_a"]
    (run_dir,) = [p.parent for p in (two_workers["b"] / "stages" / "train").glob("*/final")]
    assert not list((two_workers["a"] / "stages" / "train").glob("*/final"))
    # the stages' records follow the run's paths.results (default <paths.root>/prefect/results), not the worker's
    # Prefect default (<PREFECT_HOME>/storage)
    assert list((two_workers["b"] / "prefect" / "results").glob("train-*"))
    assert not list((two_workers["b"] / "prefect-home").rglob("train-*"))
    assert log_b.count("resumed from the tracking server") == 1, log_b[-6000:]
    assert f"Resuming from checkpoint {run_dir / 'checkpoints' / f'step-{scenario.SAVE_STEPS:08d}'}" in log_b

    # one MLflow run for the flow run: the retry reattached to it (found by the flow run id's tag)
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    runs = mlflow_client.search_runs([experiment.experiment_id],
                                     filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    assert [r.info.run_id for r in runs] == [two_workers["first"].source_run_id]
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_checkpoint"] == two_workers["first"].model_id
    # each step once: A's 4..16, then B's 20 and 24 (B's ranks log 16 again; the shipper does not send it twice)
    loss = steps(mlflow_client, run.info.run_id, "loss")
    assert sorted(loss) == list(range(scenario.LOGGING_STEPS, scenario.MAX_STEPS + 1, scenario.LOGGING_STEPS))
    assert sorted(steps(mlflow_client, run.info.run_id, "eval_loss")) == [scenario.SAVE_STEPS, scenario.MAX_STEPS]

    assert_same_weights(final_weights(run_dir), two_workers["ref"].weights())
