"""Run specs and process control for the kill tests: real `python -m trainer_core.run` processes (1 rank) and
`accelerate launch` with 2 gloo ranks on CPU, killed with SIGKILL from the test."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
KILL_POINT = {"_target_": "tests.fault_tolerance.killpoints.KillPoint"}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
# 40 samples, global micro-batch 4, 2 micro-batches a step: 5 steps an epoch, 12 steps (epochs end at 5, 10)
TRAIN_N, MAX_STEPS, SAVE_STEPS, EVAL_STEPS = 40, 12, 2, 3


def _dataset(n: int, seed: int):
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        ids = rng.integers(5, 100, size=int(rng.integers(4, 13))).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(int(ids[0] % 2))
    return datasets.Dataset.from_dict(rows)


def write_spec(root: Path, name: str, world_size: int) -> tuple[Path, Path]:
    """A run spec (dropout on, shuffled plan) whose callbacks include the KillPoint; returns (spec, output_dir)."""
    import datasets

    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import ModelSpec, RunSpec, TaskSpec

    data_dir = root / "data"
    if not data_dir.exists():
        datasets.DatasetDict({"train": _dataset(TRAIN_N, 1), "validation": _dataset(13, 2)}).save_to_disk(str(data_dir))
    args = TrainingArguments(
        per_device_train_batch_size=4 // world_size, gradient_accumulation_steps=2, max_steps=MAX_STEPS,
        learning_rate=1e-2, logging_steps=1, eval_strategy="steps", eval_steps=EVAL_STEPS, save_strategy="steps",
        save_steps=SAVE_STEPS, disable_tqdm=True, seed=5, callbacks=[KILL_POINT],
    )
    plan = build_batch_plan(TRAIN_N, 4, 2, 0, MAX_STEPS, seed=5, shuffle=True)
    (root / name).mkdir(parents=True, exist_ok=True)
    plan.save(root / name / "plan.npz")
    spec = RunSpec(
        args=args, task=TaskSpec(metrics=["accuracy"]), model=ModelSpec(config=dict(TINY_BERT), dropout=0.1),
        dataset_dir=str(data_dir), tokenizer_dir=str(root / "no-tokenizer"), plan_path=str(root / name / "plan.npz"),
        output_dir=str(root / name / "out"), config_hash="ft",
    )
    path = root / name / "spec.json"
    path.write_text(json.dumps(dataclasses.asdict(spec)))
    return path, Path(spec.output_dir)


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "FT_KILL_AT", "FT_KILL_ONCE", "FT_PAUSE"):
        out.pop(key, None)
    return out | extra


def command(spec: Path, world_size: int) -> tuple[list[str], dict[str, str]]:
    if world_size == 1:
        return [sys.executable, "-m", "trainer_core.run", "--spec", str(spec)], env(OMP_NUM_THREADS="2")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return ([accelerate, "launch", "--multi_gpu", "--num_processes", str(world_size), "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer_core.run", "--spec", str(spec)],
            env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true"))


def run_to_end(spec: Path, world_size: int) -> str:
    cmd, environment = command(spec, world_size)
    done = subprocess.run(cmd, env=environment, cwd=REPO, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants. Not just its process group: torch elastic (under
    `accelerate launch`) starts every rank in a session of its own, so killpg on the launcher misses them."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # not the root: it may be our child, and psutil would reap it before Popen sees its status
    psutil.wait_procs(procs[1:], timeout=30)
    return [proc.pid for proc in procs]


def run_and_kill(spec: Path, world_size: int, point: str, timeout: float = 300) -> str:
    """Launch, wait for the KillPoint's marker, SIGKILL the launcher and every rank (the whole process tree)."""
    cmd, environment = command(spec, world_size)
    proc = subprocess.Popen(cmd, env=environment | {"FT_KILL_AT": point}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("FT-MARK"):
                killed = kill_tree(proc.pid)
                assert len(killed) >= 1 + world_size - (world_size == 1), killed
                break
        else:
            raise AssertionError(f"never reached kill point {point}:\n" + "".join(lines[-60:]))
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
        with_rest = proc.stdout.read() if proc.stdout else ""
        lines.append(with_rest)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return "".join(lines)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "final" / "model.safetensors"))


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    different = [name for name, value in expected.items() if not torch.equal(got[name], value)]
    assert not different, f"tensors differ from the uninterrupted run: {different}"
