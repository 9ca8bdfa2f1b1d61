"""A finished run whose final/ was altered afterwards (bit rot, a bad copy, a hand edit): the same command must not
evaluate or register the altered weights; the train stage writes final/ again from the newest complete checkpoint,
and the registered version of the true weights is reused (real flows on tiny_bert)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.refs import file_sha256
from tests.pipeline.helpers import FAST, report

pytestmark = pytest.mark.integration


def _ok(done) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def _flip(path: Path) -> None:
    """Same size, other bytes near the end (tensor data, not the safetensors header): loads without an error."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 2000, len(data) - 1000):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def test_altered_final_weights_are_rebuilt_not_registered(run_cli, tmp_path) -> None:
    overrides = [*FAST, f"paths.root={tmp_path}"]
    _ok(run_cli(overrides))
    first = report(tmp_path)
    weights = Path(first["run_dir"]) / "final" / "model.safetensors"
    trained = file_sha256(weights)

    _flip(weights)
    done = run_cli(overrides)
    _ok(done)
    output = done.stdout + done.stderr
    assert "changed since training wrote it" in output
    assert file_sha256(weights) == trained  # written again from the last checkpoint, bit for bit
    again = report(tmp_path)
    assert again["model_version"] == first["model_version"]  # the true weights' version, no second one
    assert again["metrics"] == first["metrics"]

    weights.unlink()  # final/ without its weights: rebuilt too, not a "ranks exited cleanly" failure
    done = run_cli(overrides)
    _ok(done)
    assert "is incomplete" in done.stdout + done.stderr
    assert file_sha256(weights) == trained
    assert report(tmp_path)["model_version"] == first["model_version"]
