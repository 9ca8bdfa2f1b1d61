"""Content-addressed cache keys for the stages.

A stage's key hashes (1) the config subtrees and input Refs it is called with, (2) the source of the code
it runs: its own module, the project modules it imports (transitively) and any package it names, e.g. the
train stage names trainer_core, which it launches rather than imports. Prefect's default policy includes
the flow run id and TASK_SOURCE misses edited helpers, hence this.

Prefect stores one JSON record per key under its result storage. Before answering, the key function checks
that the Ref stored for that key is still valid (files present, fingerprints match); if not it drops the
record, so a cache hit whose files are gone becomes a miss instead of a crash downstream.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.config import stable_hash
from stages.refs import Ref, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("flows", "stages", "trainer_core")
NOT_IN_KEY = frozenset({"run"})
"""Parameters that say where to report (MLflow run), not what to compute."""


def _module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PROJECT_PACKAGES}


@functools.cache
def code_files(*modules: str) -> tuple[Path, ...]:
    """Source files of these modules and of every project module they import, transitively.

    A name that is a package pulls in every file under it (trainer_core runs as a whole in each rank).
    """
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        package_dir = REPO.joinpath(*name.split("."))
        if name in modules and (package_dir / "__init__.py").is_file():
            for file in package_dir.rglob("*"):
                if file.suffix in (".py", ".json", ".yaml") and "__pycache__" not in file.parts and file not in seen:
                    seen.add(file)
                    if file.suffix == ".py":
                        todo.extend(_imports(file))
            continue
        path = _module_path(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    return tuple(sorted(seen))


@functools.cache
def code_version(*modules: str) -> str:
    """Hash of the code, once per process: a process runs what it imported, so a Prefect retry keys (and
    resumes) the same run folder even if the files on disk were edited meanwhile."""
    digest = hashlib.sha256()
    for file in code_files(*modules):
        digest.update(str(file.relative_to(REPO)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def key_components(parameters: dict[str, Any], code: tuple[str, ...]) -> dict[str, str]:
    components = {name: stable_hash(value) for name, value in parameters.items() if name not in NOT_IN_KEY}
    components["code"] = code_version(*code)
    return components


def stage_key(stage: str, parameters: dict[str, Any], code: tuple[str, ...]) -> str:
    return f"{stage}-{stable_hash(key_components(parameters, code))[:24]}"


def stage_dir(root: str | Path, key: str) -> Path:
    stage = key.rsplit("-", 1)[0]
    return Path(root) / "stages" / stage / key


def _results_dir() -> Path:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    return Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())


def cache_key_fn(stage: str, code: tuple[str, ...]) -> Callable[[Any, dict[str, Any]], str]:
    """Prefect cache_key_fn for a stage whose parameters include `paths` (PathsConfig)."""

    def key_fn(_context: Any, parameters: dict[str, Any]) -> str:
        key = stage_key(stage, parameters, code)
        ref = Ref.load(stage_dir(parameters["paths"].root, key) / "ref.json")
        if ref is None or not ref.is_valid():
            # What the record points at is gone or altered: forget it so that the stage runs again.
            (_results_dir() / key).unlink(missing_ok=True)
        return key

    return key_fn


def explain_miss(stage: str, root: str | Path, components: dict[str, str], logger: logging.Logger) -> None:
    """Log which part of the key changed since this stage last ran (config subtree, input, or code)."""
    last_path = Path(root) / "stages" / stage / "last_key.json"
    try:
        last = json.loads(last_path.read_text())
    except (OSError, ValueError):
        last = None
    if last is None:
        logger.info("%s: cache miss (first run under %s)", stage, root)
    else:
        changed = sorted(name for name in components if components.get(name) != last.get(name))
        reason = ", ".join(changed) if changed else "its stored result is missing or no longer valid"
        logger.info("%s: cache miss (changed: %s)", stage, reason)
    last_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(last_path, components)


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; a plain logger when a test calls `task.fn` directly."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError and friends: not inside a run
        return logging.getLogger("stages")


def begin_stage(stage: str, parameters: dict[str, Any], code: tuple[str, ...]) -> Path:
    """Called by a stage body (so: on a cache miss). Logs why it missed; returns its empty output folder."""
    import shutil

    components = key_components(parameters, code)
    key = f"{stage}-{stable_hash(components)[:24]}"
    root = parameters["paths"].root
    explain_miss(stage, root, components, stage_logger())
    out = stage_dir(root, key)
    if out.exists():
        shutil.rmtree(out)  # a leftover without a valid ref.json: never trusted
    out.mkdir(parents=True)
    return out
