"""Lineage you can replay: what a registered version was made from, and `reproduce=` to make it again.

    record(run, version, cfg, overrides)     # the flow, once the version exists
    python -m flows.finetune reproduce=models:/rt_reviews-minilm_l6/3 paths.root=/tmp/fresh

Each version carries, as tags: `overrides` (the Hydra overrides, JSON), `config_hash` (SHA-256 of the full resolved
config less `paths` and `tracking`: where results are kept is not what was trained; another learning rate is
another hash), `packages` (the
versions that decide the numbers) and `code_version`, next to `data_fingerprint` and `model_fingerprint` from the
register stage; the resolved config itself is the run artifact `config/resolved.yaml`. `reproduce=` reads them,
names what differs from this checkout before it trains, runs the recorded overrides (the caller's `paths.*` and
`tracking.*` overrides win), and says whether the new weights equal the registered ones, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from stages.schema import ConfigError, FinetuneConfig, stable_hash

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "numpy", "peft")
WHERE = ("paths.", "tracking.")
"""Overrides that say where results go, not what is trained: the caller's win on reproduce."""


def packages() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name}=={installed_version(name)}")
        except PackageNotFoundError:
            continue
    return " ".join(found)


def resolved_config(cfg: FinetuneConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("paths", "tracking")}


def record(run, version, cfg: FinetuneConfig, overrides: list[str]) -> None:
    """Tags of the version (unless an earlier run of the same weights set them) and the resolved config."""
    import yaml

    from stages.tracking import client

    mlflow_client = client(run.tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "resolved.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        mlflow_client.log_artifacts(run.run_id, folder, "config")
    existing = mlflow_client.get_model_version(version.name, version.version).tags
    if "overrides" in existing:
        return  # these weights were registered by an earlier run: its record stands
    tags = {"overrides": json.dumps(list(overrides)), "config_hash": stable_hash(resolved_config(cfg)),
            "packages": packages(), "resolved_config": f"runs:/{run.run_id}/config/resolved.yaml"}
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(version.name, version.version, key, value)


@dataclasses.dataclass
class Recorded:
    uri: str
    name: str
    version: str
    overrides: list[str]
    tags: dict[str, str]
    pinned: dict[str, str] = dataclasses.field(default_factory=dict)
    """PINNED keys as the version's resolved config has them (a replay sets them)."""


PINNED = {"trainer.mixed_precision": "no", "trainer.optim": "adamw_torch"}
"""Keys a replay takes from the recorded resolved config, not from today's defaults, with the value a config
recorded before the key existed meant: mixed_precision (auto resolves per machine; it defaulted to no) and optim
(the default became adamw_torch_fused)."""


def find(reference: str, tracking_uri: str) -> Recorded:
    """The version `models:/<name>/<version>` or `models:/<name>@<alias>` and its recorded overrides."""
    from mlflow.exceptions import MlflowException

    from stages.tracking import client

    body = reference.removeprefix("models:/")
    name, alias = body.split("@", 1) if "@" in body else (body.rsplit("/", 1)[0], None)
    number = None if alias else body.rsplit("/", 1)[-1]
    if body == reference or not name or not (alias or (number and number.isdigit())):
        raise ConfigError(f"reproduce={reference}: give models:/<name>/<version> or models:/<name>@<alias>.")
    mlflow_client = client(tracking_uri)
    try:
        found = (mlflow_client.get_model_version_by_alias(name, alias) if alias
                 else mlflow_client.get_model_version(name, number))
    except MlflowException:
        try:
            known = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            known = []
        have = f"versions {', '.join(map(str, known))}" if known else "no such registered model"
        raise ConfigError(f"reproduce={reference}: not found in {tracking_uri} ({have}); set tracking.uri to the "
                          "store it was registered in.") from None
    if "overrides" not in found.tags:
        raise ConfigError(f"reproduce={reference}: version {found.version} records no overrides (registered before "
                          "lineage was recorded); re-create it from its run's params instead.")
    return Recorded(tracking_uri, name, found.version, json.loads(found.tags["overrides"]), dict(found.tags),
                    _pinned(mlflow_client, found.tags.get("resolved_config", "")))


def _pinned(mlflow_client, resolved_uri: str) -> dict[str, str]:
    """PINNED's keys from the resolved config artifact `runs:/<id>/config/resolved.yaml` ({} without one)."""
    import yaml

    run_id, _, path = resolved_uri.removeprefix("runs:/").partition("/")
    if not resolved_uri.startswith("runs:/") or not path:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        config = yaml.safe_load(Path(mlflow_client.download_artifacts(run_id, path, folder)).read_text())
    pinned = {}
    for key, default in PINNED.items():
        group, name = key.split(".", 1)
        pinned[key] = str((config.get(group) or {}).get(name, default))
    return pinned


def replay_overrides(recorded: Recorded, extra: list[str]) -> list[str]:
    """The recorded overrides, less where they kept results, plus the caller's."""
    # a sweep trial's record may hold the sweep's own keys: replaying is one run, not the sweep again
    kept = [o for o in recorded.overrides if not o.lstrip("+~").startswith((*WHERE, "sweep."))
            and o not in ("-m", "--multirun")]
    # keys whose default changed, or that `auto` decides per machine: the values the weights were trained with
    given = {o.split("=", 1)[0] for o in kept + list(extra)}
    kept += [f"{key}={value}" for key, value in recorded.pinned.items() if key not in given]
    return kept + list(extra)


def differences(recorded: Recorded, code_version_now: str) -> list[str]:
    """What differs between the recorded version and this checkout, in words."""
    found = []
    then = recorded.tags.get("code_version", "")
    then_src, now_src = then.rpartition("src:")[2], code_version_now.rpartition("src:")[2]
    if then_src and then_src != now_src:
        found.append(f"code version: recorded {then}, this checkout {code_version_now}")
    recorded_packages = dict(p.split("==", 1) for p in recorded.tags.get("packages", "").split() if "==" in p)
    current = dict(p.split("==", 1) for p in packages().split())
    for name in sorted(set(recorded_packages) | set(current)):
        if recorded_packages.get(name) != current.get(name):
            found.append(f"package {name}: recorded {recorded_packages.get(name, 'absent')}, "
                         f"installed {current.get(name, 'absent')}")
    return found
