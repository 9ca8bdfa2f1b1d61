"""The whole flow for language modelling: `python -m flows.finetune task=wikitext ...` on a local folder laid out
like Salesforce/wikitext (wikitext-2-raw-v1), packed causal LM on a tiny GPT-2 and masked LM on a tiny BERT;
then the registered model loaded by alias in a fresh process, predicting from raw text.

    .venv/bin/python -m pytest tests/tasks/test_lm_flow.py -m integration
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipeline.helpers import report
from tests.tasks.lm_data import write_wikitext

pytestmark = pytest.mark.integration
LM_FAST = ["trainer.max_steps=10", "trainer.per_device_train_batch_size=8", "trainer.logging_steps=5",
           "trainer.save_steps=10", "trainer.learning_rate=1e-3", "trainer.eval_strategy=no",
           "task.max_seq_length=32", "task.options.block_size=32", "model.tokenizer_vocab_size=400",
           "registry.greater_is_better=false", "registry.champion_threshold=1e9"]
FAMILIES = {
    "causal_lm": ["task.family=causal_lm", "model=tiny_gpt2", "+task.options.packing=true"],
    "masked_lm": ["task.family=masked_lm", "model=tiny_bert", "+task.options.whole_word_masking=true"],
}


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    return write_wikitext(tmp_path_factory.mktemp("data") / "wikitext")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm_run(request, run_cli, wikitext, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    done = run_cli(["task=wikitext", f"task.dataset_path={wikitext}", *FAMILIES[request.param], *LM_FAST,
                    f"paths.root={root}"])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return request.param, root, report(root)


def test_lm_flow_registers_a_candidate_with_perplexity(lm_run):
    family, root, rep = lm_run
    model = "tiny_gpt2" if family == "causal_lm" else "tiny_bert"
    assert rep["model_name"] == f"wikitext-{model}" and "candidate" in rep["aliases"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    version = client.get_model_version_by_alias(rep["model_name"], "candidate")
    assert version.run_id == rep["mlflow_run_id"]
    metrics = client.get_run(rep["mlflow_run_id"]).data.metrics
    for split in ("validation", "test"):
        assert f"{split}_loss" in metrics and f"{split}_perplexity" in metrics
        # the eval pass's own loss sums (masked LM: the same seeded masks as its loss)
        assert metrics[f"{split}_perplexity"] == pytest.approx(math.exp(metrics[f"{split}_loss"]), rel=1e-6)
        assert 1.0 < metrics[f"{split}_perplexity"] < 400  # below a uniform guess over the 400-token vocabulary
    rows = [json.loads(line) for line in Path(rep["predictions"]).read_text().splitlines()]
    assert rows and [r["row_id"] for r in rows] == list(range(len(rows)))  # one row per block, in order
    assert all(r["loss"] > 0 for r in rows)
    if family == "causal_lm":  # the test split's blocks, each scored alone: token-weighted, they give test_loss
        tokens = sum(r["tokens"] for r in rows)
        assert all(r["tokens"] > 0 for r in rows)
        assert sum(r["loss"] * r["tokens"] for r in rows) / tokens == pytest.approx(metrics["test_loss"], abs=1e-4)
        assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-3) for r in rows)
    else:
        assert all(r["masked_tokens"] >= 0 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_registered_lm_predicts_from_raw_text_in_a_fresh_process(lm_run):
    family, root, rep = lm_run
    if family == "causal_lm":
        call = ("model.predict(pd.DataFrame({'prompt': ['The cat sees', 'A dog']}), "
                "params={'max_new_tokens': 5, 'num_beams': 1})")
    else:
        call = "model.predict(pd.DataFrame({'text': ['the [MASK] sees the bridge .', 'a dog [MASK] the market .']}))"
    code = (
        "import json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri('sqlite:///{root}/mlflow.db')\n"
        f"uri = 'models:/{rep['model_name']}@candidate'\n"
        "model = mlflow.pyfunc.load_model(uri)\n"
        "sig = mlflow.models.get_model_info(uri).signature\n"
        "print(json.dumps({'inputs': [c['type'] for c in sig.inputs.to_dict()], 'params': [p.name for p in sig.params or []]}))\n"
        f"print(json.dumps({call}.to_dict(orient='records')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    signature, rows = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    # one unnamed string column (as text_classification serves): a list of raw strings or any one-column frame
    if family == "causal_lm":
        assert signature == {"inputs": ["string"], "params": ["max_new_tokens", "temperature", "num_beams"]}
        assert len(rows) == 2 and all(isinstance(r["generated_text"], str) and r["generated_text"] for r in rows)
    else:
        assert signature == {"inputs": ["string"], "params": ["top_k"]}
        assert len(rows) == 2 * 5  # top_k = 5 rows per mask, best first
        for input_row in (0, 1):
            ranked = [r for r in rows if r["input_row"] == input_row]
            assert [r["rank"] for r in ranked] == list(range(5)) and len({r["token_id"] for r in ranked}) == 5
            scores = [r["score"] for r in ranked]
            assert scores == sorted(scores, reverse=True) and 0.0 < sum(scores) <= 1.0 + 1e-6
            kept = "sees the bridge" if input_row == 0 else "the market"  # the words around the mask stay
            assert all(kept in r["sequence"] and r["mask"] == 0 for r in ranked)
