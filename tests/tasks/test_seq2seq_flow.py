"""The whole flow for task.family=seq2seq on a tiny random T5, as a user runs it:

    python -m flows.finetune task=cnn_dailymail task.dataset_path=<folder> model=tiny_t5 trainer.max_steps=10 ...

on a folder laid out like abisee/cnn_dailymail (generated here), then the registered model loaded by alias in a
fresh process and asked for summaries of raw text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipeline.helpers import report
from tests.tasks.seq2seq_data import write_cnn_dailymail

pytestmark = pytest.mark.integration

TINY = [
    "model=tiny_t5",
    "trainer.learning_rate=3e-3",
    "trainer.max_steps=10",
    "trainer.per_device_train_batch_size=8",
    "trainer.per_device_eval_batch_size=8",
    "trainer.logging_steps=5",
    "trainer.save_steps=10",
    "trainer.eval_strategy=steps",
    "trainer.eval_steps=10",
    "+task.options.generation_max_length=8",
    "task.options.max_target_length=24",
    "task.max_seq_length=64",
]
"""cnn_dailymail on tiny_t5, shrunk: 10 steps, evaluation (with generate) once during training."""


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def flow(run_cli, tmp_path_factory):
    data = write_cnn_dailymail(tmp_path_factory.mktemp("data") / "cnn_dailymail", rows_per_split=24)
    root = tmp_path_factory.mktemp("flow")
    done = run_cli(["task=cnn_dailymail", f"task.dataset_path={data}", *TINY, f"paths.root={root}"])
    _ok(done)
    return root, report(root)


def test_flow_scores_generated_summaries_and_registers_a_candidate(flow) -> None:
    root, rep = flow
    assert rep["model_name"] == "cnn_dailymail-tiny_t5" and "candidate" in rep["aliases"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(rep["mlflow_run_id"])
    for split in ("validation", "test"):
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "loss"):
            assert f"{split}_{name}" in run.data.metrics, (split, name, sorted(run.data.metrics))
    assert 0.0 <= run.data.metrics["validation_rouge1"] <= 100.0
    # generate was bounded by generation_max_length (8 new tokens, </s> included)
    assert 0 < run.data.metrics["validation_gen_len"] <= 8
    # evaluation during training (eval_strategy=steps) generated too
    assert any(m.step == 10 for m in client.get_metric_history(run.info.run_id, "eval_rouge1"))
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert len(rows) == 24 and [r["row_id"] for r in rows] == list(range(24))
    assert all(isinstance(r["summary"], str) and r["text"].startswith("The ") and r["reference"] for r in rows)
    version = client.get_model_version_by_alias(rep["model_name"], "candidate")
    assert int(version.version) == int(rep["model_version"])


def test_registered_model_summarises_raw_text_in_a_fresh_process(flow) -> None:
    root, rep = flow
    code = (
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{root}/mlflow.db')\n"
        f"model = mlflow.pyfunc.load_model('models:/{rep['model_name']}@candidate')\n"
        "texts = ['The council approved the park Monday. The team won a match.', 'The storm closed the road today.']\n"
        "params = {p.name: p.default for p in model.metadata.get_params_schema().params}\n"
        "out = model.predict(texts, params={'max_new_tokens': 3, 'num_beams': 2})\n"
        "print(json.dumps({'params': params, 'rows': out.to_dict(orient='records')}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the signature's inference params, defaulting to the evaluation settings (generation_max_length=8)
    assert result["params"]["max_new_tokens"] == 8 and result["params"]["num_beams"] == 1
    rows = result["rows"]
    assert len(rows) == 2 and all(set(r) == {"summary"} and isinstance(r["summary"], str) for r in rows)
    # 3 new tokens at most: every word takes at least one token
    assert all(len(r["summary"].split()) <= 3 for r in rows), rows


def test_a_missing_target_column_is_refused_before_training(run_cli, tmp_path) -> None:
    data = write_cnn_dailymail(tmp_path / "cnn_dailymail", rows_per_split=4)
    done = run_cli(["task=cnn_dailymail", f"task.dataset_path={data}", "task.columns.target=summary", *TINY,
                    f"paths.root={tmp_path / 'state'}"])
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "task.columns.target='summary'" in output and "highlights" in output
    assert not (tmp_path / "state" / "runs").exists()
