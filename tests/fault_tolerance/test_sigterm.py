"""Preemption: SIGTERM to every process of a run (what Kubernetes, SLURM's --signal and spot reclaims do) between
two save_steps. The ranks agree to stop at the next step boundary, write a checkpoint of that step, exit with
EX_TEMPFAIL; the relaunch resumes from it and ends bitwise equal to an uninterrupted run, every step logged once.

The KillPoint callback (killpoints.py) parks the ranks briefly after step 2 (checkpoints every 2 steps): the test
sends SIGTERM there, so the stop comes at the end of step 3, a step no periodic checkpoint covers.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.fault_tolerance.conftest import REPO, assert_same_weights, command, final_weights, run_to_end, write_spec
from trainer_core import checkpoint as ckpt
from trainer_core.run import PREEMPTED_EXIT_CODE
from trainer_core.spec import PREEMPTED

pytestmark = pytest.mark.integration


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _sigterm_after_step(spec: Path, world_size: int, step: int) -> tuple[int, str]:
    """Run until the ranks park after `step`, SIGTERM the launcher and every rank, wait for them to exit."""
    cmd, environment = command(spec, world_size)
    proc = subprocess.Popen(cmd, env=environment | {"FT_KILL_AT": f"step_end:{step}", "FT_PAUSE": "2"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("FT-MARK"):
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                for member in tree:
                    member.send_signal(signal.SIGTERM)
                break
        lines.append(proc.stdout.read())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines)


def _preempt_then_resume(tmp_path: Path, world_size: int) -> None:
    spec, reference_out = write_spec(tmp_path, "reference", world_size)
    run_to_end(spec, world_size)
    spec, out = write_spec(tmp_path, "preempted", world_size)
    code, log = _sigterm_after_step(spec, world_size, 2)
    if world_size == 1:
        assert code == PREEMPTED_EXIT_CODE, log[-3000:]
    assert code != 0 and f"{PREEMPTED} stopped at step 3 of 12" in log, log[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == "step-00000003", log[-3000:]
    assert ckpt.verify(ckpt.checkpoint_dir(out, 3)) is None
    assert not (out / "final").exists()
    log = run_to_end(spec, world_size)
    assert f"Resuming from checkpoint {ckpt.checkpoint_dir(out, 3)}" in log
    assert_same_weights(final_weights(out), final_weights(reference_out))
    assert _metrics(out) == _metrics(reference_out)  # every step once, the same values


def test_one_process_checkpoints_on_sigterm_and_resumes_bitwise(tmp_path) -> None:
    _preempt_then_resume(tmp_path, 1)


def test_two_ranks_stop_together_on_sigterm_and_resume_bitwise(tmp_path) -> None:
    _preempt_then_resume(tmp_path, 2)


def test_save_on_sigterm_false_keeps_the_default_action(tmp_path) -> None:
    spec, out = write_spec(tmp_path, "plain", 1)
    raw = json.loads(spec.read_text())
    raw["args"]["save_on_sigterm"] = False
    spec.write_text(json.dumps(raw))
    code, log = _sigterm_after_step(spec, 1, 2)
    assert code == -signal.SIGTERM, log[-3000:]
    # killed in step 2's on_step_end, before its periodic save: nothing was written on the way out
    assert ckpt.list_checkpoints(out) == []
