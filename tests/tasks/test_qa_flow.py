"""The whole flow for extractive QA on a tiny BERT: `python -m flows.finetune task=squad_v2 ...` on a local
folder laid out like rajpurkar/squad_v2, then the registered model loaded by alias in a fresh process.

    .venv/bin/python -m pytest tests/tasks/test_qa_flow.py -m integration
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipeline.helpers import report
from tests.tasks.qa_data import write_squad_folder

pytestmark = pytest.mark.integration
ROWS = 48
QA_FAST = ["model=tiny_bert", "trainer.max_steps=10", "trainer.per_device_train_batch_size=8",
           "trainer.logging_steps=5", "trainer.save_steps=10", "trainer.learning_rate=1e-3",
           "task.max_seq_length=48", "task.options.doc_stride=16", "task.options.max_answer_length=8"]


@pytest.fixture(scope="module")
def squad_v2_run(run_cli, tmp_path_factory):
    data = write_squad_folder(tmp_path_factory.mktemp("data") / "squad_v2", rows_per_split=ROWS, v2=True)
    root = tmp_path_factory.mktemp("flow")
    done = run_cli(["task=squad_v2", f"task.dataset_path={data}", *QA_FAST, f"paths.root={root}"])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return root, report(root)


def test_squad_v2_flow_registers_a_candidate_with_squad_metrics(squad_v2_run):
    root, rep = squad_v2_run
    assert rep["model_name"] == "squad_v2-tiny_bert" and "candidate" in rep["aliases"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    metrics = client.get_run(rep["mlflow_run_id"]).data.metrics
    for split in ("validation", "test"):  # the Hub repo has no test split: validation is predicted again
        for name in ("exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "loss"):
            assert f"{split}_{name}" in metrics, f"{split}_{name}"
            assert name == "loss" or 0.0 <= metrics[f"{split}_{name}"] <= 1.0
    version = client.get_model_version_by_alias(rep["model_name"], "candidate")
    assert version.tags["metric.exact_match"]
    # one prediction row per question (not per window), in the split's order, each a span of its context
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert [r["row_id"] for r in rows] == list(range(ROWS))
    assert [r["id"] for r in rows] == [f"validation-{i:05d}" for i in range(ROWS)]
    for r in rows:
        assert set(r) >= {"question", "answer", "score", "start", "end", "true_answers"}
        assert (r["answer"] == "") == (r["start"] == -1)
    # the file's exact match (answers are single words: normalisation changes nothing) is the reported one
    exact = sum(r["answer"] == (r["true_answers"][0] if r["true_answers"] else "") for r in rows) / ROWS
    assert exact == pytest.approx(metrics["test_exact_match"])


def test_registered_qa_model_answers_from_raw_text_in_a_fresh_process(squad_v2_run):
    root, rep = squad_v2_run
    context = "the weather was mild . alice lives in paris and works as a baker ."
    code = (
        "import json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri('sqlite:///{root}/mlflow.db')\n"
        f"model = mlflow.pyfunc.load_model('models:/{rep['model_name']}@candidate')\n"
        f"frame = pd.DataFrame({{'question': ['where does alice live ?', 'what does alice work as ?'],"
        f" 'context': [{context!r}] * 2}})\n"
        "print(json.dumps(model.predict(frame).to_dict(orient='records')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 2
    for r in rows:
        assert set(r) == {"answer", "score", "start", "end"} and 0.0 <= r["score"] <= 1.0
        assert r["answer"] == (context[r["start"] : r["end"]] if r["start"] >= 0 else "")
