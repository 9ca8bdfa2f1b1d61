"""Fixtures of the checkpoint-store tests:
- `mlflow_server`: the real `mlflow server` of tests/serving (SQLite backend, artifacts proxied into a tmp folder
  with --artifacts-destination), one per session;
- `uninterrupted`: the kill scenario's run (tests/tracking/kill_scenario.py) trained once without a kill, in the
  background from the first test that asks for it, so that it runs beside that test's killed flow; the resumed
  runs of every such test must end with its weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.serving.conftest import mlflow_server  # noqa: F401 - the fixture, shared rather than copied


@dataclass
class Uninterrupted:
    root: Path
    thread: threading.Thread
    done: dict = field(default_factory=dict)

    def weights(self) -> dict:
        """Its final weights (waits for it to finish)."""
        from tests.pipeline.helpers import report
        from tests.tracking.kill_scenario import final_weights

        self.thread.join()
        assert self.done.get("returncode") == 0, self.done.get("output", "")[-6000:]
        return final_weights(report(self.root)["run_dir"])


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    from tests.fault_tolerance.conftest import kill_tree
    from tests.fault_tolerance.test_flow_retry import _snapshot
    from tests.tracking.kill_scenario import OVERRIDES, flow

    tmp = tmp_path_factory.mktemp("uninterrupted")
    root = tmp / "root"
    proc = flow(_snapshot(tmp / "repo"), [*OVERRIDES, f"paths.root={root}"])  # its own SQLite store
    reference = Uninterrupted(root, threading.Thread(target=lambda: None))

    def read() -> None:
        reference.done["output"] = proc.communicate(timeout=900)[0]
        reference.done["returncode"] = proc.returncode

    reference.thread = threading.Thread(target=read, daemon=True)
    reference.thread.start()
    yield reference
    if proc.poll() is None:
        kill_tree(proc.pid)
