"""Multi-process CPU runs of trainer_core.run launched the way the train stage launches them (hardware group →
accelerate YAML → `accelerate launch`), plus a callback that records what every rank trained on.

The run itself is tests/trainer_core/test_launch.py's `_spec`: 37 samples, global micro-batch G = 8
(per-device 8 // world size), 2 accumulation steps, 6 optimizer steps (2 epochs of 3), checkpoints at 3 and 6.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.trainer_core.test_launch import HardKill, _env, _spec  # noqa: F401  (shared with the trainer_core launch tests)
from trainer_core.callbacks import TrainerCallback

REPO = Path(__file__).resolve().parents[2]

RECORD = "tests.distributed.helpers.RecordSamples"
KILL = "tests.trainer_core.test_launch.HardKill"


class RecordSamples(TrainerCallback):
    """Appends one JSON line per event to `<path>.rank<r>`: the parameters this rank holds (at train begin) and
    the sample indices of every micro-batch it trained on (at each step end). Flushed per line: a hard kill
    loses nothing already recorded."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        rank = int(os.environ.get("RANK", "0"))
        with open(f"{self.path}.rank{rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": rank, **record}) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        from trainer_core.fsdp2 import parameter_counts

        local, total = parameter_counts(model)
        sharded = sum(isinstance(p, DTensor) for p in model.parameters())
        self._write({"event": "params", "local": local, "total": total, "dtensor_params": sharded,
                     "start_step": state.global_step})

    def on_step_end(self, args, state, control, sample_indices=(), **kwargs):
        self._write({"event": "step", "step": state.global_step, "micro_batches": [list(x) for x in sample_indices]})


def read_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for file in sorted(path.parent.glob(path.name + ".rank*")):
        out += [json.loads(line) for line in file.read_text().splitlines()]
    return out


def make_spec(tmp_path: Path, name: str, world_size: int, *, distributed: dict | None = None,
              record: bool = True, kill_at: int | None = None, **arg_changes: Any):
    """test_launch's run, optionally FSDP (RunSpec.distributed), recording samples, killed at a step."""
    callbacks: list[dict[str, Any]] = []
    if record:
        callbacks.append({"_target_": RECORD, "path": str(tmp_path / name / f"samples-ws{world_size}")})
    if kill_at is not None:
        callbacks.append({"_target_": KILL, "step": kill_at})
    spec, path = _spec(tmp_path, name, world_size=world_size, callbacks=callbacks)
    spec = dataclasses.replace(spec, args=dataclasses.replace(spec.args, **arg_changes),
                               distributed=dict(distributed or {}))
    path.write_text(spec.to_json())
    return spec, path


def launch(overrides: list[str], spec_path: Path, *, env: dict[str, str] | None = None,
           background: bool = False, tag: str = "") -> Any:
    """Compose `hardware=...`, write its accelerate YAML and run stages.launch's command (what the train
    stage does). `env` is applied while composing (multinode reads its topology from it) and to the ranks."""
    from flows.config import compose
    from stages.launch import launch_command, write_accelerate_config

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        hardware = compose(overrides).hardware
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    config = write_accelerate_config(hardware, spec_path.parent / f"accelerate{tag}.yaml")
    cmd, launch_env = launch_command(hardware, config, ["-m", "trainer_core.run", "--spec", str(spec_path)])
    run_env = launch_env | _env() | dict(env or {}) | {"OMP_NUM_THREADS": "1"}
    if "ACCELERATE_USE_CPU" in launch_env:
        run_env["ACCELERATE_USE_CPU"] = launch_env["ACCELERATE_USE_CPU"]
    run_env["PYTHONPATH"] = str(REPO)
    if background:
        return subprocess.Popen(cmd, env=run_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, env=run_env, cwd=REPO, capture_output=True, text=True, timeout=300)


def hardware_of(overrides: list[str]):
    from flows.config import compose

    return compose(overrides).hardware


def metrics(spec) -> list[dict[str, Any]]:
    return metrics_of(Path(spec.output_dir))


def metrics_of(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_relaunch_equals(overrides: list[str], spec_path: Path, killed_out: Path, ref_spec) -> None:
    """Relaunch a run killed in step 5 (what a Prefect retry does: same run folder, no kill) and check it resumed
    from step 3 and ended bitwise equal to the uninterrupted `ref_spec`: final weights and every logged value."""
    import torch
    from safetensors.torch import load_file

    assert not (killed_out / "final").exists()
    assert [p.name for p in (killed_out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    relaunch = launch(overrides, spec_path)
    log = relaunch.stdout + relaunch.stderr
    assert relaunch.returncode == 0, log[-4000:]
    assert "Resuming from checkpoint" in log and "step-00000003" in log
    ref = load_file(str(Path(ref_spec.output_dir) / "final" / "model.safetensors"))
    got = load_file(str(killed_out / "final" / "model.safetensors"))
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
    assert [r["metrics"] for r in metrics_of(killed_out)] == [r["metrics"] for r in metrics(ref_spec)]
