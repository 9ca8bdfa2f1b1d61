"""Lineage you can replay: a registered version records its overrides, resolved config, packages and code version;
`reproduce=models:/<name>/<version>` re-runs them on an empty paths.root and finds the same weights, bit for bit,
names a difference in code version before it trains, and names a version that does not exist."""

from __future__ import annotations

import json

import pytest

from tests.pipeline.helpers import FAST

pytestmark = pytest.mark.integration
SMALL = [*FAST, "task.max_train_samples=128", "task.max_eval_samples=32", "task.max_predict_samples=32"]
NAME = "rt_reviews-tiny_bert"


def test_reproduce_gives_the_registered_weights_and_names_differences(run_cli, tmp_path) -> None:
    from mlflow import MlflowClient

    first_root, again_root = tmp_path / "first", tmp_path / "again"
    store = f"sqlite:///{first_root / 'mlflow.db'}"
    done = run_cli([*SMALL, "trainer.learning_rate=2e-3", f"paths.root={first_root}"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version(NAME, "1")
    assert json.loads(version.tags["overrides"])[-1] == f"paths.root={first_root}"
    assert "torch==" in version.tags["packages"] and len(version.tags["config_hash"]) == 64
    run_id = version.tags["mlflow_run_id"]
    resolved = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path / "dl"))
    assert "learning_rate: 0.002" in open(resolved).read()

    again = [f"reproduce=models:/{NAME}/1", f"paths.root={again_root}", f"tracking.uri={store}"]
    done = run_cli(again)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "reproduce: the weights equal models:/rt_reviews-tiny_bert/1 bit for bit" in output
    assert "reproduce: warning" not in output
    assert (again_root / "stages" / "train").is_dir()  # trained anew, not served from the first root's cache
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]  # same weights, same version

    client.set_model_version_tag(NAME, "1", "code_version", "git:0000000 src:0123456789abcdef")
    done = run_cli(again)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "reproduce: warning: code version: recorded git:0000000 src:0123456789abcdef, this checkout src:" in output

    done = run_cli([f"reproduce=models:/{NAME}/7", f"paths.root={again_root}", f"tracking.uri={store}"])
    assert done.returncode == 2
    assert f"error: reproduce=models:/{NAME}/7: not found in {store} (versions 1)" in done.stderr
