"""The command line's own temporary Prefect API (flows/temporary_api.py): flows run on it, a new root starts from
the database template, a broken template is replaced, and the server never outlives the process that started it.

Each case runs in a fresh Python process: Prefect reads PREFECT_API_URL when it is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tests.pipeline.helpers import REPO

SCRIPT = """
import json, os, sys
from flows.temporary_api import TemporaryAPI, template_path
api = TemporaryAPI.start()
seeded = api.seeded
api.wait()
from prefect import flow
@flow(name="probe")
def probe():
    from prefect.runtime import flow_run
    return str(flow_run.get_id())
run_id = probe()
from prefect.settings import PREFECT_API_URL
print(json.dumps({"url": api.url, "setting": PREFECT_API_URL.value(), "seeded": seeded, "run": run_id,
                  "pid": api.process.pid, "template": str(template_path())}))
"""


def _run(home: Path, cache: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "XDG_CACHE_HOME": str(cache), "PREFECT_API_URL": "",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _flow_runs(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT id FROM flow_run").fetchall()
    connection.close()
    return [row[0].replace("-", "") for row in rows]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0  # a zombie of nobody's: gone too


def test_flows_run_on_the_temporary_api_and_new_roots_start_from_the_template(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    template = cache / "finetune" / f"prefect-{metadata.version('prefect')}.db"
    template.parent.mkdir(parents=True)
    # a cache left by a broken install: a database at a revision this Prefect does not know (its server exits)
    with contextlib.closing(sqlite3.connect(template)) as con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
        con.commit()

    first = _run(tmp_path / "a", cache)
    assert first["setting"] == first["url"]  # the flow ran on our API, not on one Prefect started itself
    assert first["seeded"] is True  # it tried the bad template ...
    assert first["run"].replace("-", "") in _flow_runs(tmp_path / "a" / "prefect.db")  # ... then migrated
    assert Path(first["template"]) == template
    assert _flow_runs(template) == []  # the new template: migrated, and saved before any flow ran
    assert _gone(first["pid"])

    second = _run(tmp_path / "b", cache)
    assert second["seeded"] is True
    assert _flow_runs(tmp_path / "b" / "prefect.db") == [second["run"].replace("-", "")]
    assert _flow_runs(template) == []
    assert _gone(second["pid"])


def _servers_of(home: Path) -> list[int]:
    """Processes running a Prefect API server with this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if "prefect.server.api.server:create_app" in (proc / "cmdline").read_text() and \
                    f"PREFECT_HOME={home}\0" in (proc / "environ").read_text():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def test_a_run_refused_in_a_used_root_stops_the_api_it_had_started(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "prefect").mkdir(parents=True)
    sqlite3.connect(root / "prefect" / "prefect.db").close()  # a root in use: its API starts before the preflight
    done = run_cli(["trainer.mixed_precision=fp16", f"paths.root={root}"], env={"PREFECT_API_URL": ""}, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and "trainer.mixed_precision=fp16" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert _servers_of(root / "prefect") == []
