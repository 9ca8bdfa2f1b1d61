"""Bad input to flows.registry and flows.predict, without servers: one `error:` line, exit non-zero, no traceback,
no output file. (The same against a live MLflow server: test_mlflow_registry.py.)"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from flows import predict, registry
from flows.predict import input_columns
from flows.registry import RegistryError, parse_model_uri, previous_champion
from stages.launch import free_port


def _in_process(main, args: list[str], monkeypatch, capsys) -> subprocess.CompletedProcess:
    """Call a CLI's main() here (no interpreter start-up, no mlflow import per call), as if run in a subprocess."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.setenv(key, os.environ.get(key, "0" if key.endswith("RETRIES") else "20"))  # main's setdefaults undone
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _fails_cleanly(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert all(n in errors[0] for n in needles), errors[0]
    assert "Traceback" not in done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A SQLite registry holding one model with one alias-less name and no versions."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("known-model")
    return uri


def test_registry_unknown_model_lists_the_known_ones(store: str, monkeypatch, capsys) -> None:
    done = _in_process(registry.main, ["--tracking-uri", store, "show", "nope"], monkeypatch, capsys)
    _fails_cleanly(done, 1, "no registered model 'nope'", "known-model")


def test_registry_unknown_alias(store: str, monkeypatch, capsys) -> None:
    done = _in_process(registry.main, ["--tracking-uri", store, "show", "known-model"], monkeypatch, capsys)
    _fails_cleanly(done, 1, "has no alias 'champion'")  # show's default: the champion
    done = _in_process(registry.main, ["--tracking-uri", store, "rollback", "known-model"], monkeypatch, capsys)
    _fails_cleanly(done, 1, "no champion to roll back")


def test_registry_uri_that_does_not_answer_fails_fast(run_module) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = run_module("flows.registry", "--tracking-uri", uri, "list")
    _fails_cleanly(done, 1, uri, "does not answer")
    assert time.monotonic() - started < 30


def test_registry_without_a_store(run_module, tmp_path: Path) -> None:
    done = run_module("flows.registry", "--root", str(tmp_path), "list")
    _fails_cleanly(done, 1, "no MLflow store", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # a read command creates no database


def test_registry_honours_mlflow_tracking_uri(run_module, store: str) -> None:
    done = run_module("flows.registry", "list", env={"MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stderr
    assert "known-model" in done.stdout


def test_predict_missing_input_file(run_module, store: str, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    done = run_module("flows.predict", "model=models:/known-model@champion", f"input={tmp_path / 'nope.jsonl'}",
                      f"output={output}", f"tracking_uri={store}")
    _fails_cleanly(done, 1, "input file", "does not exist")
    assert not output.exists()


@pytest.mark.parametrize(
    ("model", "needle"),
    [("models:/no-such-model@champion", "no registered model 'no-such-model'"),
     ("models:/known-model@champion", "has no alias 'champion'"),
     ("known-model", "expected models:/<name>@<alias>")],
)
def test_predict_unknown_model_writes_nothing(store: str, tmp_path: Path, model: str, needle: str, monkeypatch,
                                             capsys) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine."}\n')
    output = tmp_path / "out.csv"
    done = _in_process(predict.main, [f"model={model}", f"input={source}", f"output={output}", f"tracking_uri={store}"],
                       monkeypatch, capsys)
    _fails_cleanly(done, 1, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_predict_registry_that_does_not_answer(run_module, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine."}\n')
    output = tmp_path / "out.jsonl"
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_module("flows.predict", "model=models:/m@champion", f"input={source}", f"output={output}",
                      f"tracking_uri={uri}")
    _fails_cleanly(done, 1, "does not answer")
    assert time.monotonic() - started < 30 and not output.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["model=models:/m@champion", "input=a.jsonl"], "missing output=..."),
     (["model=models:/m@champion", "input=a.txt", "output=b.csv"], "input=a.txt: expected a .jsonl or .csv"),
     (["model=models:/m@champion", "input=a.csv", "output=b.csv", "batch_size=0"], "batch_size='0'"),
     (["modle=models:/m@champion"], "unexpected argument 'modle=")],
)
def test_predict_bad_arguments(run_module, tmp_path: Path, args: list[str], needle: str) -> None:
    _fails_cleanly(run_module("flows.predict", *args), 2, needle)


def test_pair_model_needs_both_columns() -> None:
    pairs = ["sentence1", "sentence2"]
    assert input_columns(pd.DataFrame({"sentence1": ["a"], "sentence2": ["b"], "id": [1]}), pairs) == pairs
    with pytest.raises(RegistryError, match=r"no column 'sentence2': this model reads sentence1, sentence2"):
        input_columns(pd.DataFrame({"sentence1": ["a"], "text": ["b"]}), pairs)


def test_single_text_model_takes_its_column_then_text_then_the_only_column() -> None:
    assert input_columns(pd.DataFrame({"sentence": ["a"], "text": ["b"]}), ["sentence"]) == ["sentence"]
    assert input_columns(pd.DataFrame({"id": [1], "text": ["b"]}), ["sentence"]) == ["text"]
    assert input_columns(pd.DataFrame({"review": ["b"]}), ["sentence"]) == ["review"]
    with pytest.raises(RegistryError, match="rename the text column to 'text'"):
        input_columns(pd.DataFrame({"a": ["x"], "b": ["y"]}), ["sentence"])


def test_model_uri_and_rollback_chain() -> None:
    assert parse_model_uri("models:/glue-sst2-tiny_bert@champion") == ("glue-sst2-tiny_bert", "champion")
    assert parse_model_uri("models:/glue-sst2-tiny_bert/3") == ("glue-sst2-tiny_bert", "3")

    class Version:
        def __init__(self, version: str, tags: dict[str, str]):
            self.version, self.tags = version, tags

    assert previous_champion(Version("3", {"gate.decision": "promoted", "gate.champion_version": "2"})) == "2"
    assert previous_champion(Version("1", {"gate.decision": "promoted", "gate.champion_version": "None"})) is None
    assert previous_champion(Version("2", {"gate.decision": "not_promoted", "promoted_by": "manual",
                                           "promoted_from": "3"})) == "3"
    assert previous_champion(Version("2", {"gate.decision": "not_promoted"})) is None


def test_serve_refuses_without_a_prefect_api(run_module, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    done = run_module("flows.serve", "--root", str(tmp_path / "state"), "--api-url", url)
    _fails_cleanly(done, 1, url, "does not answer", "prefect server start --host 127.0.0.1")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "state").exists()  # refused before creating any state
    _fails_cleanly(run_module("flows.serve", "--max-trainings", "0", "--api-url", url), 2, "--max-trainings")
