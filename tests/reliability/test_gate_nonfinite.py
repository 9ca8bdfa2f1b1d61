"""The champion gate refuses a NaN or infinite metric whatever the threshold (real SQLite registry)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stages.register import CHAMPION, gate
from stages.schema import RegistryConfig

NAME = "sentiment"
DATA = "data-fp"


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    # one store for the module: creating a SQLite registry takes seconds, and the gate only reads
    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")
    client.create_registered_model(NAME)
    return client


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_metric_never_becomes_champion(client, value) -> None:
    for threshold in (-math.inf, 0.0, 0.7, math.inf, math.nan):
        for greater_is_better in (True, False):
            registry = RegistryConfig(model_name=NAME, champion_metric="accuracy", champion_threshold=threshold,
                                      greater_is_better=greater_is_better)
            decision = gate(client, registry, {"accuracy": value}, DATA)
            assert not decision.promote, (threshold, greater_is_better, decision)
            assert "not finite" in decision.reason


def test_nonfinite_metric_does_not_replace_a_champion(client, tmp_path: Path) -> None:
    name = "with-champion"
    client.create_registered_model(name)
    source = tmp_path / "m"
    source.mkdir()
    version = client.create_model_version(name, source=str(source), tags={"metric.loss": "0.5", "data_fingerprint": DATA})
    client.set_registered_model_alias(name, CHAMPION, str(version.version))
    registry = RegistryConfig(model_name=name, champion_metric="loss", champion_threshold=math.inf,
                              greater_is_better=False)
    assert not gate(client, registry, {"loss": math.nan}, DATA).promote
    assert not gate(client, registry, {"loss": -math.inf}, DATA).promote
    assert gate(client, registry, {"loss": 0.4}, DATA).promote  # a finite, better loss still passes
