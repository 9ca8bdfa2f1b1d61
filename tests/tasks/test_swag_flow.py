"""The whole flow for multiple choice on a tiny BERT: `python -m flows.finetune task=swag ...` on a local folder
laid out like allenai/swag (config regular), then the registered model loaded by alias in a fresh process.

    .venv/bin/python -m pytest tests/tasks/test_swag_flow.py -m integration
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipeline.helpers import report
from tests.tasks.qa_data import write_swag_folder

pytestmark = pytest.mark.integration
ROWS = 48
SWAG_FAST = ["model=tiny_bert", "trainer.max_steps=10", "trainer.per_device_train_batch_size=8",
             "trainer.logging_steps=5", "trainer.save_steps=10", "trainer.learning_rate=1e-3", "task.max_seq_length=32"]


@pytest.fixture(scope="module")
def swag_run(run_cli, tmp_path_factory):
    data = write_swag_folder(tmp_path_factory.mktemp("data") / "swag", rows_per_split=ROWS)
    root = tmp_path_factory.mktemp("flow")
    done = run_cli(["task=swag", f"task.dataset_path={data}", *SWAG_FAST, f"paths.root={root}"])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return root, report(root)


def test_swag_flow_registers_a_candidate_with_accuracy(swag_run):
    root, rep = swag_run
    assert rep["model_name"] == "swag-tiny_bert" and "candidate" in rep["aliases"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    metrics = client.get_run(rep["mlflow_run_id"]).data.metrics
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0 and "validation_loss" in metrics
    assert not any(k.startswith("test_") for k in metrics if k != "test_loss")  # SWAG test labels are -1
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert [r["row_id"] for r in rows] == list(range(ROWS))
    for r in rows:
        assert r["label"] in range(4) and len(r["scores"]) == 4 and "true_label" not in r
        assert r["scores"][r["label"]] == max(r["scores"]) and sum(r["scores"]) == pytest.approx(1.0, abs=1e-4)
        assert {"sent1", "sent2", "ending0", "ending3"} <= set(r)


def test_registered_swag_model_picks_an_ending_in_a_fresh_process(swag_run):
    root, rep = swag_run
    code = (
        "import json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri('sqlite:///{root}/mlflow.db')\n"
        f"model = mlflow.pyfunc.load_model('models:/{rep['model_name']}@candidate')\n"
        "frame = pd.DataFrame({'sent1': ['alice takes the train to rome .'], 'sent2': ['alice'],"
        " 'ending0': ['eats the pilot .'], 'ending1': ['arrives in rome .'], 'ending2': ['turns into a baker .'],"
        " 'ending3': ['sings to the oslo moon .']})\n"
        "print(json.dumps(model.predict(frame).to_dict(orient='records')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    scores = [row[f"score_{i}"] for i in range(4)]
    assert row["index"] in range(4) and scores[row["index"]] == max(scores) == pytest.approx(row["score"])
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
