"""The registry on a real `mlflow server`: the flow logs and registers through HTTP, a fresh process predicts by
alias, two flows register to the same name at once, a weaker model does not take champion, and champion moves
by hand (promote) and back (rollback)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.pipeline.helpers import REPO, report, sentence
from tests.serving.runs import GOOD, MODEL_NAME

pytestmark = pytest.mark.integration


def _client(server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def _labelled_rows(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        positive = rng.random() < 0.5
        rows.append({"sentence": sentence(rng, positive), "expected": "positive" if positive else "negative"})
    return rows


def test_flow_logs_and_registers_through_http(champion_run, mlflow_server) -> None:
    client = _client(mlflow_server)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.version == "1" and set(version.aliases) == {"candidate", "champion"}
    assert version.tags["prefect_flow_run_id"] == str(champion_run.id)
    assert version.tags["gate.decision"] == "promoted"
    assert version.source.startswith("mlflow-artifacts:/")  # proxied by the server, not a local path
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["validation_accuracy"] >= 0.9
    # the server stored the model files under its --artifacts-destination
    assert list((mlflow_server.root / "artifacts").rglob("MLmodel"))


def test_fresh_process_predicts_by_alias(run_module, champion_run, mlflow_server, tmp_path: Path) -> None:
    rows = _labelled_rows(40)
    source = tmp_path / "reviews.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "scored.csv"
    done = run_module("flows.predict", f"model=models:/{MODEL_NAME}@champion", f"input={source}", f"output={output}",
                      "batch_size=16", "log_every=16", f"tracking_uri={mlflow_server.url}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predict: 16/40 rows" in done.stderr and "predict: 32/40 rows" in done.stderr
    assert "predict: 40/40 rows" in done.stderr
    scored = pd.read_csv(output)
    assert list(scored.columns) == ["sentence", "expected", "label", "score"]
    assert (scored["label"] == scored["expected"]).mean() >= 0.9
    assert scored["score"].between(0.5, 1.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.jsonl", "scored.csv"]  # no temp file left


def test_predict_reads_a_text_column_from_csv_and_writes_jsonl(run_module, champion_run, mlflow_server, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": [1, 2], "text": ["the film was great and superb.", "the plot was dull and awful."]}).to_csv(
        source, index=False)
    output = tmp_path / "out.jsonl"
    done = run_module("flows.predict", f"model=models:/{MODEL_NAME}/1", f"input={source}", f"output={output}",
                      env={"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["the film was great and superb.", "the plot was dull and awful."]
    assert all(r["label"] in ("positive", "negative") for r in rows)


@pytest.fixture(scope="module")
def concurrent_runs(champion_run, served, mlflow_server, glue_data, prefect_server, tmp_path_factory):
    """Two CLI flows started together, same registered name: a hopeless learning rate and a good one."""
    # threshold 0: the weak run must lose against the champion, not against the threshold
    common = [f"task.dataset_path={glue_data}", f"tracking.uri={mlflow_server.url}", "registry.champion_threshold=0.0"]
    roots = {"weak": served.root, "good": tmp_path_factory.mktemp("good")}
    overrides = {
        "weak": [*GOOD, "trainer.learning_rate=1e-9", *common, f"paths.root={roots['weak']}"],
        "good": [*GOOD, "trainer.learning_rate=1e-2", *common, f"paths.root={roots['good']}"],
    }
    env = {**os.environ, "PREFECT_API_URL": prefect_server.url}
    procs = {
        k: subprocess.Popen([sys.executable, "-m", "flows.finetune", *v], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for k, v in overrides.items()
    }
    outputs = {k: p.communicate(timeout=540)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, f"{k}: exit {p.returncode}\n{outputs[k][-4000:]}"
    return {k: report(root) for k, root in roots.items()}


def test_concurrent_registrations_keep_aliases_consistent(concurrent_runs, mlflow_server) -> None:
    client = _client(mlflow_server)
    weak, good = concurrent_runs["weak"]["model_version"], concurrent_runs["good"]["model_version"]
    found = client.search_model_versions(f"name = '{MODEL_NAME}'")
    versions = {v.version: client.get_model_version(MODEL_NAME, v.version) for v in found}  # search omits aliases
    assert set(versions) == {"1", "2", "3"} and {weak, good} == {"2", "3"}
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert aliases["candidate"] in (weak, good)
    assert aliases["champion"] in ("1", good)
    assert sum("champion" in v.aliases for v in versions.values()) == 1


def test_weaker_model_does_not_take_champion(concurrent_runs, mlflow_server) -> None:
    client = _client(mlflow_server)
    weak = client.get_model_version(MODEL_NAME, concurrent_runs["weak"]["model_version"])
    assert "champion" not in weak.aliases
    assert weak.tags["gate.decision"] == "not_promoted"
    assert weak.tags["gate.metric"] == "accuracy"
    assert float(weak.tags["gate.value"]) <= 0.75  # lr 1e-9: the model is still the random init
    assert float(weak.tags["gate.champion_value"]) >= 0.9
    # same data: "worse than champion"; a champion prepared under another paths.root may count as other data
    assert "worse than champion" in weak.tags["gate.reason"] or "other data" in weak.tags["gate.reason"]


def test_promote_and_rollback_move_champion(run_module, concurrent_runs, mlflow_server) -> None:
    client = _client(mlflow_server)
    weak = concurrent_runs["weak"]["model_version"]
    before = client.get_registered_model(MODEL_NAME).aliases["champion"]
    uri = ["--tracking-uri", mlflow_server.url]

    done = run_module("flows.registry", *uri, "promote", MODEL_NAME, weak)
    assert done.returncode == 0, done.stderr
    assert f"champion v{before} -> v{weak}" in done.stdout
    assert client.get_registered_model(MODEL_NAME).aliases["champion"] == weak
    tags = client.get_model_version(MODEL_NAME, weak).tags
    assert tags["promoted_by"] == "manual" and tags["promoted_from"] == before

    shown = run_module("flows.registry", *uri, "show", MODEL_NAME)
    assert shown.returncode == 0, shown.stderr
    assert f"{MODEL_NAME} v{weak}" in shown.stdout and "gate:     not_promoted" in shown.stdout
    assert "accuracy" in shown.stdout and "promoted: by manual" in shown.stdout

    done = run_module("flows.registry", *uri, "rollback", MODEL_NAME)
    assert done.returncode == 0, done.stderr
    assert client.get_registered_model(MODEL_NAME).aliases["champion"] == before
    history = json.loads(client.get_registered_model(MODEL_NAME).tags["champion_history"])
    assert [(h["action"], h["version"]) for h in history] == [("promote", weak), ("rollback", before)]

    listed = run_module("flows.registry", *uri, "list")
    assert listed.returncode == 0, listed.stderr
    assert MODEL_NAME in listed.stdout and all(f"v{v}" in listed.stdout for v in ("1", "2", "3"))


def _fails_cleanly(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert all(n in errors[0] for n in needles), errors[0]
    assert "Traceback" not in done.stderr


def test_unknown_model_or_alias_on_the_server(run_module, champion_run, mlflow_server, tmp_path: Path) -> None:
    uri = ["--tracking-uri", mlflow_server.url]
    _fails_cleanly(run_module("flows.registry", *uri, "show", "no-such-model"), "no registered model", MODEL_NAME)
    _fails_cleanly(run_module("flows.registry", *uri, "show", MODEL_NAME, "staging"), "no alias 'staging'")
    _fails_cleanly(run_module("flows.registry", *uri, "promote", MODEL_NAME, "99"), "no version '99'")
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "great."}\n')
    output = tmp_path / "out.jsonl"
    started = time.monotonic()
    done = run_module("flows.predict", "model=models:/no-such-model@champion", f"input={source}",
                      f"output={output}", f"tracking_uri={mlflow_server.url}")
    _fails_cleanly(done, "no registered model")
    assert time.monotonic() - started < 60
    assert not output.exists()


def test_predict_input_without_the_model_column(run_module, champion_run, mlflow_server, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"review": ["great."], "stars": ["5"]}).to_csv(source, index=False)
    output = tmp_path / "out.csv"
    done = run_module("flows.predict", f"model=models:/{MODEL_NAME}@champion", f"input={source}",
                      f"output={output}", f"tracking_uri={mlflow_server.url}")
    _fails_cleanly(done, "'sentence'", "'text'", "review, stars")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
