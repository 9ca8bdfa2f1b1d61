"""The Prefect API of a command-line run where PREFECT_API_URL is not set.

It is the server Prefect's ephemeral mode starts (the same uvicorn command and settings, its database in
PREFECT_HOME = <paths.root>/prefect), but started by the command line itself, before prefect is imported: it
boots on the other core while this process imports prefect and mlflow and opens the MLflow store (Prefect would
start it only once the flow begins, after importing its server code). The flow runs reach it through
PREFECT_API_URL, as they reach a `prefect server`; it stops when the process exits, after Prefect's log and
event workers have flushed.

A new paths.root starts from a template of Prefect's database (its 113 SQLite migrations applied, ~10 s of work
on 2 cores) kept per Prefect version in the user's cache folder: the first new root on a machine migrates and saves
it, every later one copies it. Only Prefect's default database (a SQLite file in PREFECT_HOME) is templated.
"""

from __future__ import annotations

import atexit
import os
import socket
import sqlite3
import subprocess
import sys
import time
from importlib import metadata, util
from pathlib import Path

from stages import db_template
from stages.health import probe

SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's ephemeral mode sets for its server process."""


class TemporaryAPI:
    """A Prefect API server for this process's flow runs (the module docstring says why and how)."""

    current: TemporaryAPI | None = None
    """The one this process started (the preflight does not probe it: wait() reports its failure)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.process: subprocess.Popen | None = None
        with socket.socket() as sock:  # a free port on loopback (a relaunch reuses it: prefect may know the URL)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        # where `prefect` is installed, found without importing it (the server's --app-dir, as Prefect passes it)
        self._app_dir = str(Path(util.find_spec("prefect").origin).parent.parent)
        self.seeded = self._save_template = False
        if "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ and not (home / "prefect.db").exists():
            self.seeded = _seed_from_template(home / "prefect.db")
            self._save_template = not self.seeded
        self._launch()
        atexit.register(self.stop)

    @classmethod
    def start(cls) -> TemporaryAPI | None:
        """Start it where this process's flows would otherwise start Prefect's ephemeral server: no PREFECT_API_URL,
        ephemeral mode not switched off, and prefect not yet imported (its settings are read at import). Sets
        PREFECT_API_URL for this process (and the processes it starts) until stop()."""
        switched_off = any(os.environ.get(name, "").lower() in ("0", "false", "no") for name in
                           ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"))
        if os.environ.get("PREFECT_API_URL") or switched_off or "prefect" in sys.modules:
            return None
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        home.mkdir(parents=True, exist_ok=True)
        cls.current = cls(home)
        os.environ["PREFECT_API_URL"] = cls.current.url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at <url>" line per flow run
        return cls.current

    def _launch(self) -> None:
        env = {**os.environ, **SERVER_ENV}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL,
        )

    def wait(self) -> None:
        """Until the API answers; RuntimeError if it exits or does not answer within
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."""
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20"))
        deadline = time.monotonic() + timeout
        while (problem := probe(self.url, timeout_seconds=1.0)) is not None:
            code = self.process.poll()
            if code is not None and self.seeded:  # a bad template (a cache from a broken install?): migrate instead
                self.seeded, self._save_template = False, True
                template_path().unlink(missing_ok=True)
                for leftover in ("prefect.db", "prefect.db-wal", "prefect.db-shm"):
                    (self.home / leftover).unlink(missing_ok=True)
                self._launch()
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect API exited with code {code} before it answered (its "
                                   f"messages are above); PREFECT_HOME={self.home}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect API did not answer within {timeout:.0f} s ({problem}); "
                                   "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")
            else:
                time.sleep(0.05)
        if self._save_template:  # migrated, and nothing of a flow in it yet
            self._save_template = False
            _save_template(self.home / "prefect.db")

    def stop(self) -> None:
        if os.environ.get("PREFECT_API_URL") == self.url:
            del os.environ["PREFECT_API_URL"]
            if os.environ.get("PREFECT_UI_URL") == "":
                del os.environ["PREFECT_UI_URL"]
        if TemporaryAPI.current is self:
            TemporaryAPI.current = None
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def template_path() -> Path:
    return db_template.path("prefect", metadata.version("prefect"))


def _seed_from_template(database: Path) -> bool:
    return db_template.seed(database, template_path())


def _save_template(database: Path) -> None:
    def no_flow_runs(copy: sqlite3.Connection) -> bool:  # another flow in the same new root must not seed others
        return copy.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 0

    db_template.save(database, template_path(), no_flow_runs)
