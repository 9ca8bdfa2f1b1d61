"""A tracking server or Prefect API that does not answer fails the CLI in seconds, before any stage starts.

Port 9 (discard) on loopback: nothing listens there, so a connection is refused at once; without the preflight
probe MLflow's client retries with back-off for minutes.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.pipeline.helpers import REPO

NOBODY = "http://127.0.0.1:9"
BOUND_SECONDS = 30  # a bound, not a benchmark


def _cli(overrides: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    import os

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.finetune", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    return done, time.monotonic() - started


@pytest.mark.parametrize(("override", "env", "names"), [
    ([f"tracking.uri={NOBODY}"], {"PREFECT_API_URL": ""}, "tracking.uri"),
    ([], {"PREFECT_API_URL": f"{NOBODY}/api"}, "PREFECT_API_URL"),
], ids=["mlflow", "prefect"])
def test_unreachable_server_fails_fast_with_one_error_line(tmp_path, override, env, names) -> None:
    root = tmp_path / "state"
    done, seconds = _cli(["model=tiny_bert", *override, f"paths.root={root}"], env)
    assert done.returncode != 0
    assert seconds < BOUND_SECONDS, f"took {seconds:.1f} s"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert names in errors[0] and "does not answer" in errors[0]
    assert "Task run" not in done.stderr + done.stdout  # no stage started
    assert not root.exists() or not any(root.iterdir())
