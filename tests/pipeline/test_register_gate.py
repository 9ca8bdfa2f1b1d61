"""The champion gate against a real (SQLite) MLflow registry: thresholds, comparisons, concurrent promotions."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from stages.register import CHAMPION, GateDecision, _settle_champion, gate
from stages.schema import RegistryConfig

NAME = "sentiment"
DATA = "data-fp"


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(NAME)
    return client


def _version(client: MlflowClient, tmp_path: Path, accuracy: float, data: str = DATA) -> str:
    source = tmp_path / f"m{accuracy}"
    source.mkdir(exist_ok=True)
    tags = {"metric.accuracy": str(accuracy), "data_fingerprint": data}
    return str(client.create_model_version(NAME, source=str(source), tags=tags).version)


def _registry(threshold: float = 0.7) -> RegistryConfig:
    return RegistryConfig(model_name=NAME, champion_metric="accuracy", champion_threshold=threshold)


def test_gate_threshold_then_comparison_with_the_champion(client, tmp_path) -> None:
    assert not gate(client, _registry(), {"accuracy": 0.6}, DATA).promote  # below the threshold
    first = gate(client, _registry(), {"accuracy": 0.8}, DATA)
    assert first.promote and "no champion yet" in first.reason
    client.set_registered_model_alias(NAME, CHAMPION, _version(client, tmp_path, 0.8))
    worse = gate(client, _registry(), {"accuracy": 0.75}, DATA)
    assert not worse.promote and worse.champion_value == 0.8 and "worse than champion v1" in worse.reason
    assert gate(client, _registry(), {"accuracy": 0.8}, DATA).promote  # no worse is enough
    other_data = gate(client, _registry(), {"accuracy": 0.99}, "other-data")
    assert not other_data.promote and "other data" in other_data.reason


@pytest.mark.parametrize("finish_order", [("better", "worse"), ("worse", "better")])
def test_concurrent_promotions_leave_the_better_one_champion(client, tmp_path, finish_order) -> None:
    client.set_registered_model_alias(NAME, CHAMPION, _version(client, tmp_path, 0.8))  # v1
    versions = {"worse": (_version(client, tmp_path, 0.85), 0.85), "better": (_version(client, tmp_path, 0.9), 0.9)}
    registry = _registry()
    # both judged against v1 before either moved the alias: both passed
    decisions = {k: GateDecision(True, "race", value, "1", 0.8) for k, (_, value) in versions.items()}
    for key, (version, _) in versions.items():
        for tag, value in decisions[key].tags(registry).items():
            client.set_model_version_tag(NAME, version, tag, value)
    for key in finish_order:  # each writes its alias, then settles
        client.set_registered_model_alias(NAME, CHAMPION, versions[key][0])
        _settle_champion(client, registry, decisions[key], DATA)
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == versions["better"][0]


def _gated(client: MlflowClient, registry: RegistryConfig, version: str, decision: GateDecision) -> None:
    for tag, value in decision.tags(registry).items():
        client.set_model_version_tag(NAME, version, tag, value)


def test_a_rolled_back_champion_does_not_come_back_through_a_later_promotion(client, tmp_path) -> None:
    from flows.registry import cmd_rollback

    registry = _registry()
    first = _version(client, tmp_path, 0.8)
    client.set_registered_model_alias(NAME, CHAMPION, first)
    # v2 passed the gate against v1 and took champion; the team found it bad in production and rolled back
    second = _version(client, tmp_path, 0.9)
    _gated(client, registry, second, GateDecision(True, "better", 0.9, first, 0.8))
    client.set_registered_model_alias(NAME, CHAMPION, second)
    cmd_rollback(client, NAME)
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == first
    # a later run passes the gate against v1 (the champion it saw): no race, v2 must stay demoted
    third = _version(client, tmp_path, 0.85)
    decision = gate(client, registry, {"accuracy": 0.85}, DATA)
    assert decision.promote and str(decision.champion_version) == first
    _gated(client, registry, third, decision)
    client.set_registered_model_alias(NAME, CHAMPION, third)
    _settle_champion(client, registry, decision, DATA)
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == third


def test_a_version_promoted_on_other_data_is_no_racer(client, tmp_path) -> None:
    registry = _registry()
    # v1 took champion when there was none, on other data; its champion alias is gone since (v2 replaced it and
    # was deleted)
    old = _version(client, tmp_path, 0.95, data="old-data")
    _gated(client, registry, old, GateDecision(True, "no champion yet", 0.95, None))
    replaced = _version(client, tmp_path, 0.96, data="old-data")
    client.set_registered_model_alias(NAME, CHAMPION, replaced)
    client.delete_model_version(NAME, replaced)
    new = _version(client, tmp_path, 0.9)
    decision = gate(client, registry, {"accuracy": 0.9}, DATA)
    assert decision.promote and decision.champion_version is None
    _gated(client, registry, new, decision)
    client.set_registered_model_alias(NAME, CHAMPION, new)
    _settle_champion(client, registry, decision, DATA)
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == new


def test_a_registration_stopped_after_its_version_was_created_is_finished_by_the_rerun(tmp_path) -> None:
    """Killed (or the server gone) between create_model_version and the gate: the version of these weights exists
    without aliases or a gate decision. The rerun reuses the version (no second one) and gives it what it missed."""
    from flows.config import compose
    from stages import register as stage
    from stages.refs import DatasetRef, MetricsRef, ModelRef
    from stages.schema import PathsConfig
    from stages.tracking import CANDIDATE, RunInfo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    run = RunInfo(run_id=client.create_run("0").info.run_id, tracking_uri=uri, experiment_id="0")
    (tmp_path / "final").mkdir()
    model = ModelRef(path=str(tmp_path / "final"), fingerprint="weights-sha", run_dir=str(tmp_path),
                     spec_path=str(tmp_path / "spec.json"), global_step=4, training_loss=0.5)
    client.create_registered_model(NAME)
    stopped = client.create_model_version(NAME, source=str(tmp_path / "final"), run_id=run.run_id,
                                          tags={"model_fingerprint": "weights-sha", "data_fingerprint": DATA,
                                                "peft.method": "none"})
    metrics = MetricsRef(path=str(tmp_path / "m.json"), metrics={"accuracy": 0.9}, split="validation",
                         num_samples=8, fingerprint="m")
    data = DatasetRef(path=str(tmp_path), fingerprint=DATA, num_rows={}, input_columns=["text"], vocab_size=10,
                      tokenizer_fingerprint="t")
    ref = stage.register.fn(model=model, metrics=metrics, data=data, task=compose([]).task, registry=_registry(),
                            tracking_uri=uri, paths=PathsConfig(root=str(tmp_path / "root")), run=run)
    assert ref.version == str(stopped.version)  # reused, not registered again
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    version = client.get_model_version(NAME, ref.version)
    assert sorted(version.aliases) == [CANDIDATE, CHAMPION] and version.tags["gate.decision"] == "promoted"
