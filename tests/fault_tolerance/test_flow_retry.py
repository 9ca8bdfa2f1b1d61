"""The whole flow (`python -m flows.finetune`), its train stage's ranks SIGKILLed from outside after a checkpoint:
Prefect's retry relaunches, trainer_core resumes, the flow exits 0, and nothing is lost or logged twice.

The kill lands at step 17 (checkpoint at 12, `loss` already logged and shipped to MLflow for step 16), so the
retry re-logs step 16 in metrics.jsonl and the MetricShipper must not send it again. The reference is the same
flow (same overrides) in another paths.root, uninterrupted; both run at once to save wall time.

Both run `python -m flows.finetune` like tests/pipeline/helpers.run_cli, but from a snapshot of the source tree
taken when the test starts: the train stage's run folder is keyed on the code, so an edit of trainer_core
between the killed attempt and the retry (other work in the same checkout) would send the retry to a fresh
folder and the test would no longer test a resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.fault_tolerance.conftest import assert_same_weights, kill_tree
from tests.pipeline.helpers import FAST, REPO, report
from trainer_core import checkpoint as ckpt

pytestmark = pytest.mark.integration
OVERRIDES = [*FAST, "stages.train_retries=2", "stages.retry_delay_seconds=1",
             "trainer.callbacks=[{_target_:tests.fault_tolerance.killpoints.KillPoint}]"]
MAX_STEPS, LOGGING_STEPS, SAVE_STEPS = 24, 4, 12


def _snapshot(dest: Path) -> Path:
    for name in ("flows", "stages", "trainer_core", "conf", "tests"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _in_thread(repo: Path, overrides, env):
    box: dict = {}

    def run():
        box["done"] = subprocess.run([sys.executable, "-m", "flows.finetune", *overrides], cwd=repo,
                                     env={**os.environ, "PYTHONPATH": str(repo), **env}, capture_output=True,
                                     text=True, timeout=900)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def _only_run(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """The killed-and-retried flow and its uninterrupted reference (run at once)."""
    tmp_path = tmp_path_factory.mktemp("flow-retry")
    killed_root, ref_root = tmp_path / "killed", tmp_path / "ref"
    once = tmp_path / "parked.once"
    repo = _snapshot(tmp_path / "repo")
    ref_thread, ref = _in_thread(repo, [*OVERRIDES, f"paths.root={ref_root}"], env={})
    thread, box = _in_thread(repo, [*OVERRIDES, f"paths.root={killed_root}"],
                             env={"FT_KILL_AT": "step_end:17", "FT_KILL_ONCE": str(once), "FT_PAUSE": "300"})

    # the rank parks after step 17; by then checkpoint 12 is committed and step 16 logged
    _wait_for(once.exists, 600, "the rank to reach step 17")
    run_dir = next((killed_root / "stages" / "train").glob("*/launcher.pid")).parent
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == [f"step-{SAVE_STEPS:08d}"]
    client = MlflowClient(f"sqlite:///{killed_root}/mlflow.db")
    run_id = _only_run(client).info.run_id
    _wait_for(lambda: 16 in _loss_steps(client, run_id), 60, "the shipper to send step 16 to MLflow")
    launcher = int((run_dir / "launcher.pid").read_text())
    assert kill_tree(launcher)

    thread.join()
    ref_thread.join()
    done, reference = box["done"], ref["done"]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-6000:]
    return {"tmp_path": tmp_path, "repo": repo, "killed_root": killed_root, "ref_root": ref_root, "run_dir": run_dir,
            "launcher": launcher, "output": output, "client": client}


def test_sigkill_ranks_mid_flow_prefect_retry_resumes_and_mlflow_stays_clean(flows):
    tmp_path, killed_root, ref_root = flows["tmp_path"], flows["killed_root"], flows["ref_root"]
    run_dir, launcher, output, client = flows["run_dir"], flows["launcher"], flows["output"], flows["client"]
    (tmp_path / "flow_output.log").write_text(output)
    # the first attempt died, Prefect ran the task again: a new launcher, which resumed from the checkpoint
    assert int((run_dir / "launcher.pid").read_text()) != launcher
    assert "Retry" in output or "retry" in output, output[-6000:]
    assert f"Resuming from checkpoint {run_dir / 'checkpoints' / f'step-{SAVE_STEPS:08d}'}" in output

    rep, ref_rep = report(killed_root), report(ref_root)
    assert rep["global_step"] == MAX_STEPS
    assert Path(rep["run_dir"]) == run_dir
    # exactly one MLflow run for the flow run, finished, reattached to by nothing else
    run = _only_run(client)
    assert run.info.run_id == rep["mlflow_run_id"] and run.info.status == "FINISHED"
    # one loss point per logged step, none twice, with the uninterrupted flow's values
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    ref_client = MlflowClient(f"sqlite:///{ref_root}/mlflow.db")
    ref_history = ref_client.get_metric_history(ref_rep["mlflow_run_id"], "loss")
    assert {m.step: m.value for m in history} == {m.step: m.value for m in ref_history}
    # params logged once and unchanged: the reference's, up to the paths.root they name
    ref_params = ref_client.get_run(ref_rep["mlflow_run_id"]).data.params
    assert run.data.params == {k: v.replace(str(ref_root), str(killed_root)) for k, v in ref_params.items()}
    # one registered version
    versions = client.search_model_versions(f"name = '{rep['model_name']}'")
    assert [str(v.version) for v in versions] == [str(rep["model_version"])]
    # the weights of an uninterrupted flow
    from safetensors.torch import load_file

    got = load_file(str(run_dir / "final" / "model.safetensors"))
    expected = load_file(str(Path(ref_rep["run_dir"]) / "final" / "model.safetensors"))
    assert_same_weights(got, expected)
    assert all(isinstance(v, torch.Tensor) for v in got.values())


def test_resume_from_another_runs_checkpoint_through_the_flow(flows):
    """trainer.resume_from_checkpoint=<the reference run's step-12 checkpoint>: a new run folder (the key covers the
    option), resumed from the other folder, logged as such; it ends on the reference's weights, so the register
    stage reuses the reference's version."""
    ref_root = flows["ref_root"]
    ref_rep = report(ref_root)
    source = Path(ref_rep["run_dir"]) / "checkpoints" / f"step-{SAVE_STEPS:08d}"
    thread, box = _in_thread(flows["repo"], [*OVERRIDES, f"paths.root={ref_root}",
                                             f"trainer.resume_from_checkpoint={source}"], env={})
    thread.join()
    done = box["done"]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    rep = report(ref_root)
    assert rep["run_dir"] != ref_rep["run_dir"] and rep["global_step"] == MAX_STEPS
    assert f"Resuming from the checkpoint asked for (trainer.resume_from_checkpoint): {source}" in output
    client = MlflowClient(f"sqlite:///{ref_root}/mlflow.db")
    run = client.get_run(rep["mlflow_run_id"])
    assert run.data.tags["resumed_from"] == f"resume: {source}"
    assert run.data.params["trainer.resume_from_checkpoint"] == str(source)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [16, 20, 24]
    from safetensors.torch import load_file

    got = load_file(str(Path(rep["run_dir"]) / "final" / "model.safetensors"))
    assert_same_weights(got, load_file(str(Path(ref_rep["run_dir"]) / "final" / "model.safetensors")))
    assert str(rep["model_version"]) == str(ref_rep["model_version"])  # the same weights: the same registered version
