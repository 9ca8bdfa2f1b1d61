"""A full disk while checkpointing: a clear error naming the folder and the space needed, nothing partial left, the
last complete checkpoint kept, and the run resumes (bitwise equal to an uninterrupted one) once space is back.

The run folder lives on a small tmpfs that the test mounts and resizes (`mount -o remount,size=`): root only,
skipped with the reason elsewhere. Sizes are set from the size of the reference run's first checkpoint S:
  0.5 S  the first checkpoint fails half written (ENOSPC): no checkpoint, no temp folder;
  1.5 S  step 2 fits and leaves less than S free: a warning right away, and step 4 is refused before writing;
  20 S   the relaunch resumes from step 2 and finishes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.fault_tolerance.conftest import assert_same_weights, command, final_weights, run_to_end, write_spec
from trainer_core import checkpoint as ckpt
from trainer_core.run import DISK_FULL_EXIT_CODE
from trainer_core.spec import DISK_FULL

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")

    def resize(size: int) -> None:
        size = (size + 4095) // 4096 * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _run(spec: Path) -> subprocess.CompletedProcess:
    cmd, environment = command(spec, 1)
    return subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=400)


def test_full_disk_fails_clearly_keeps_the_last_checkpoint_and_resumes(tmp_path, small_disk) -> None:
    mount, resize = small_disk
    spec, reference_out = write_spec(tmp_path, "reference", 1)
    run_to_end(spec, 1)
    size = ckpt.tree_size(ckpt.checkpoint_dir(reference_out, 2))

    spec, _ = write_spec(tmp_path, "full", 1)
    raw = json.loads(spec.read_text())
    out = mount / "out"
    raw["output_dir"] = str(out)
    spec.write_text(json.dumps(raw))

    resize(size // 2)
    done = _run(spec)
    log = done.stdout + done.stderr
    assert done.returncode == DISK_FULL_EXIT_CODE, log[-3000:]
    assert f"{DISK_FULL} checkpoint step-00000002: no space left on the device writing {out}" in log, log[-3000:]
    assert "no complete checkpoint yet" in log
    assert "Traceback" not in log
    assert not (out / "checkpoints").exists() or list((out / "checkpoints").iterdir()) == []

    (out / "metrics.jsonl").unlink(missing_ok=True)
    resize(size * 3 // 2 + ckpt.tree_size(out) + 16 * 4096)
    done = _run(spec)
    log = done.stdout + done.stderr
    assert done.returncode == DISK_FULL_EXIT_CODE, log[-3000:]
    assert "room for 0 more checkpoint(s)" in log, log[-3000:]  # warned as soon as step 2 was written
    assert (f"{DISK_FULL} checkpoint step-00000004 needs about" in log and f"but {out} has" in log
            and "nothing was written" in log), log[-3000:]
    assert f"the newest complete checkpoint {ckpt.checkpoint_dir(out, 2)} is kept" in log
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert ckpt.verify(ckpt.checkpoint_dir(out, 2)) is None

    resize(size * 20)
    log = run_to_end(spec, 1)
    assert f"Resuming from checkpoint {ckpt.checkpoint_dir(out, 2)}" in log
    assert_same_weights(final_weights(out), final_weights(reference_out))
