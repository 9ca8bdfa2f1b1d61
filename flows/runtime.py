"""Process environment for a flow run, set before prefect, mlflow or transformers are imported.

Prefect reads its settings at import: its home, its result storage and its telemetry switch must be in the
environment first. Paths are absolute (Hydra-style chdirs would otherwise split a relative home).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def results_path(root: str | Path, results: str | None = None) -> Path:
    """Where Prefect keeps the cached stages' records (paths.results): a path or a file:// URL, e.g. a
    filesystem every worker mounts; None = <paths.root>/prefect/results."""
    from urllib.parse import urlparse

    from stages.schema import ConfigError

    if not results:
        return Path(root).resolve() / "prefect" / "results"
    parsed = urlparse(results)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve()
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ConfigError(
            f"paths.results={results}: the stages read their cache records as files, so the result storage must be a "
            "path or file:// URL (mount the shared storage, e.g. NFS or s3fs, and give its mount point)."
        )
    return Path(results).resolve()


def configure(root: str | Path, results: str | None = None) -> None:
    storage = results_path(root, results)
    root = Path(root).resolve()  # nothing is created here: a refused run leaves no trace
    defaults = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The first start in a new home runs the DB migrations: Prefect's 20 s default is too tight on 2 cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        # print stays print: dill's bytecode dumps (datasets' fingerprinting) must not become log records
        "PREFECT_LOGGING_LOG_PRINTS": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_CACHE": str(root / "hf-datasets"),
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # the register stage's signature check reads the packaged model back: one bar per file otherwise
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect's own settings win over a user's profile for these two: our cache lives under paths.root.
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(storage)
    for noisy in ("httpx", "httpcore", "urllib3", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def create_state_dirs(root: str | Path) -> None:
    """Called once the input passed preflight: Prefect needs its home's parent to exist."""
    (Path(root).resolve() / "prefect").mkdir(parents=True, exist_ok=True)
