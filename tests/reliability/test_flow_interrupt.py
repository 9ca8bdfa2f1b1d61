"""SIGTERM to the flow process (a scheduler, `timeout`, Kubernetes) mid-training: the flow stops its ranks, they
checkpoint the step they are at, the flow exits with one error line; the same command then resumes from that
checkpoint and finishes. (Ctrl-C takes the same path: SIGINT raises KeyboardInterrupt in the flow.)

The ranks park briefly after step 5 (tests/fault_tolerance/killpoints.py); periodic checkpoints are at 12 and 24.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.pipeline.helpers import FAST, REPO, report

pytestmark = pytest.mark.integration
KILL_POINT = "trainer.callbacks=[{_target_:tests.fault_tolerance.killpoints.KillPoint}]"


def test_sigterm_to_the_flow_checkpoints_the_ranks_and_the_rerun_resumes(tmp_path) -> None:
    root = tmp_path / "state"
    overrides = [*FAST, "task.max_train_samples=128", "task.max_eval_samples=32", "task.max_predict_samples=32",
                 f"paths.root={root}", KILL_POINT]
    env = {**os.environ, "FT_KILL_AT": "step_end:5", "FT_PAUSE": "3", "FT_KILL_ONCE": str(tmp_path / "parked")}
    flow = subprocess.Popen([sys.executable, "-m", "flows.finetune", *overrides], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in flow.stdout:
        lines.append(line)
        if "FT-MARK" in line:
            flow.send_signal(signal.SIGTERM)
            break
    lines.append(flow.communicate(timeout=300)[0])
    output = "".join(lines)
    assert flow.returncode == 130, output[-4000:]
    assert "error: interrupted; the ranks saved the step they were at" in output
    assert "training stopped on SIGTERM: stopped at step 6 of 24" in output, output[-4000:]
    (run_dir,) = (root / "stages" / "train").glob("train-*/checkpoints/step-00000006")

    done = subprocess.run([sys.executable, "-m", "flows.finetune", *overrides], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"Resuming from checkpoint {run_dir}" in output
    assert report(root)["global_step"] == 24
