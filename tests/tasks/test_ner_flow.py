"""The whole flow for token classification on a tiny BERT: `python -m flows.finetune task=conll2003 ...` on a local
folder laid out like eriktks/conll2003, then the registered model loaded by alias in a fresh process.

    .venv/bin/python -m pytest tests/tasks/test_ner_flow.py -m integration
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipeline.helpers import REPO, report
from tests.tasks.ner_data import write_conll_folder

pytestmark = pytest.mark.integration
ROWS = 40
NER_FAST = ["model=tiny_bert", "trainer.max_steps=12", "trainer.per_device_train_batch_size=8",
            "trainer.logging_steps=4", "trainer.save_steps=12", "trainer.learning_rate=5e-3", "task.max_seq_length=32"]


@pytest.fixture(scope="module")
def ner_run(run_cli, tmp_path_factory):
    data = write_conll_folder(tmp_path_factory.mktemp("data") / "conll2003", rows_per_split=ROWS)
    root = tmp_path_factory.mktemp("flow")
    done = run_cli(["task=conll2003", f"task.dataset_path={data}", *NER_FAST, f"paths.root={root}",
                    "registry.champion_threshold=0"])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return root, report(root)


def test_conll_flow_registers_a_candidate_with_entity_metrics(ner_run):
    root, rep = ner_run
    assert rep["model_name"] == "conll2003-tiny_bert" and "candidate" in rep["aliases"]
    metrics = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(rep["mlflow_run_id"]).data.metrics
    for split in ("validation", "test"):
        for name in ("f1", "precision", "recall", "accuracy", "loss"):
            assert f"{split}_{name}" in metrics, name
        assert 0.0 <= metrics[f"{split}_f1"] <= 1.0
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert [r["row_id"] for r in rows] == list(range(ROWS))
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    for r in rows:  # one tag per word, read back at each word's first sub-token
        assert len(r["tags"]) == len(r["tokens"]) == len(r["true_tags"])
        assert set(r["tags"]) <= set(names) and all(isinstance(e["text"], str) for e in r["entities"])
    # the word-level accuracy of the file agrees with the reported token accuracy (first sub-tokens only)
    right = sum(p == t for r in rows for p, t in zip(r["tags"], r["true_tags"], strict=True))
    total = sum(len(r["tags"]) for r in rows)
    assert right / total == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def test_registered_tagger_tags_words_in_a_fresh_process(ner_run):
    root, rep = ner_run
    code = (
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{root}/mlflow.db')\n"
        f"model = mlflow.pyfunc.load_model('models:/{rep['model_name']}@candidate')\n"
        "out = model.predict(['Grace Hopper visited Rome .', 'Bob left Paris .'])\n"
        "print(json.dumps(out.to_dict(orient='records')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(root), capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    assert [len(json.loads(r["tags"])) for r in records] == [5, 4]  # one tag per whitespace-separated word
    for record in records:
        for entity in json.loads(record["entities"]):
            assert entity["type"] in {"PER", "ORG", "LOC", "MISC"} and entity["end"] > entity["start"]
