"""Process environment for a flow run, set before prefect, mlflow or transformers are imported.

Prefect reads its settings at import: its home, its result storage and its telemetry switch must be in the
environment first. Paths are absolute (Hydra-style chdirs would otherwise split a relative home).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def results_location(root: str | Path, results: str | None = None) -> str:
    """Where Prefect keeps the cached stages' records (paths.results): an absolute path (a path or file:// URL,
    e.g. a filesystem every worker mounts) or the URL of any fsspec filesystem whose package is installed
    (s3://, gs://, az://, ...); None = <paths.root>/prefect/results. Refused here, before any work, when the
    URL's protocol is unknown or its package missing."""
    from urllib.parse import urlparse

    if not results:
        return str(Path(root).resolve() / "prefect" / "results")
    parsed = urlparse(results)
    if parsed.scheme == "file":
        return str(Path(parsed.path).resolve())
    if not parsed.scheme or len(parsed.scheme) == 1:  # a one-letter scheme is a Windows drive
        return str(Path(results).resolve())
    _check_protocol(results, parsed.scheme)
    return results.rstrip("/")


def _check_protocol(url: str, protocol: str) -> None:
    import fsspec
    from fsspec.registry import known_implementations

    from stages.schema import ConfigError

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise ConfigError(
            f"paths.results={url}: the {protocol}:// protocol needs the package {package}, which is not installed "
            f"(pip install {package}), or give a path or file:// URL ({exc})."
        ) from None
    except ValueError:
        raise ConfigError(
            f"paths.results={url}: fsspec knows no protocol {protocol!r}; give a path, a file:// URL or the URL of "
            "an fsspec filesystem (s3://bucket/prefix, gs://..., az://...)."
        ) from None


def is_remote(location: str) -> bool:
    return "://" in location


def probe_results(url: str) -> None:
    """Refuse a remote paths.results that does not answer (down, wrong endpoint or credentials, no bucket): Prefect
    would only log an error at each stage and run it uncached."""
    import fsspec

    from stages.schema import ConfigError

    filesystem, path = fsspec.core.url_to_fs(url)
    try:
        try:
            filesystem.ls(path)
        except FileNotFoundError:  # no record yet: the bucket (container) itself must exist
            filesystem.ls(path.split("/")[0])
    except FileNotFoundError:
        raise ConfigError(f"paths.results={url}: its bucket does not exist; create it or give another URL.") from None
    except Exception as exc:  # noqa: BLE001 - whatever the filesystem raises for an unreachable or refused store
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConfigError(
            f"paths.results={url}: the result storage does not answer ({type(exc).__name__}: {reason}); check the "
            "URL, the credentials in the environment (as its fsspec package reads them) and that the server is up."
        ) from None


def result_storage(root: str | Path, results: str | None = None):
    """What the stage tasks persist their records in (`task.with_options(result_storage=...)`): a Path, or for
    a remote URL a RemoteFileSystem block saved on the Prefect API under a name derived from the URL (Prefect
    tasks take only saved blocks; the credentials stay in the environment, as fsspec reads them: nothing secret
    is saved). Call inside a flow run (it imports prefect and talks to its API)."""
    location = results_location(root, results)
    if not is_remote(location):
        return Path(location)
    import hashlib

    from prefect.filesystems import RemoteFileSystem

    probe_results(location)
    block = RemoteFileSystem(basepath=location)
    block.save(f"finetune-results-{hashlib.sha256(location.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def configure(root: str | Path, results: str | None = None) -> None:
    location = results_location(root, results)
    root = Path(root).resolve()  # nothing is created here: a refused run leaves no trace
    # a remote paths.results reaches the stage tasks through the flow (result_storage); Prefect's own local
    # storage stays under the root
    storage = root / "prefect" / "results" if is_remote(location) else location
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
    # (mlflow.pyfunc: "Validating input example against model signature" at each register)
    for noisy in ("httpx", "httpcore", "urllib3", "alembic", "filelock", "mlflow.store.db.utils", "mlflow.pyfunc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def create_state_dirs(root: str | Path) -> None:
    """Called once the input passed preflight: Prefect needs its home's parent to exist."""
    (Path(root).resolve() / "prefect").mkdir(parents=True, exist_ok=True)
