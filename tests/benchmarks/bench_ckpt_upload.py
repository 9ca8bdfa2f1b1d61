"""Benchmark: what uploading every checkpoint to MLflow costs the training (tracking.log_checkpoints).

    .venv/bin/python tests/benchmarks/bench_ckpt_upload.py                       # 120 steps, a save every 20
    .venv/bin/python tests/benchmarks/bench_ckpt_upload.py --steps 200 --save-steps 20 --hidden 384 --repeats 2

Starts a local `mlflow server` (SQLite backend, --artifacts-destination in a temp folder), then trains the same
run (a random BERT sized by --hidden/--layers: checkpoint = weights + Adam state) with and without the upload,
alternating, --repeats times each. As in the train stage, the ranks are a `python -m trainer_core.run`
subprocess and the upload is stages.checkpoint_store.CheckpointUploader in this (the flow's) process, polling the
run folder; so the two compete for the same CPU cores, which is the cost measured. Steps/s comes from the ranks'
own clock (first to last optimizer step, start-up excluded); "drain" is how long the last uploads took after
the ranks exited (the train stage waits for them before it returns). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from trainer_core.callbacks import TrainerCallback  # noqa: E402

CLOCK = {"_target_": "tests.benchmarks.bench_ckpt_upload.StepClock"}


class StepClock(TrainerCallback):
    """In the rank: wall time of each optimizer step's end, written to $BENCH_STEP_CLOCK at the end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        Path(os.environ["BENCH_STEP_CLOCK"]).write_text(json.dumps(self.times))


def _spec(root: Path, name: str, steps: int, save_steps: int, hidden: int, layers: int) -> Path:
    import datasets
    import numpy as np

    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import ModelSpec, RunSpec, TaskSpec

    data_dir = root / "data"
    if not data_dir.exists():
        rng = np.random.default_rng(0)
        ids = [rng.integers(5, 8000, size=32).tolist() for _ in range(256)]
        rows = {"input_ids": ids, "attention_mask": [[1] * 32] * 256, "labels": [i[0] % 2 for i in ids]}
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                              "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(data_dir))
    args = TrainingArguments(per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4, logging_steps=10,
                             save_strategy="steps", save_steps=save_steps, save_total_limit=2, disable_tqdm=True,
                             seed=1, callbacks=[CLOCK])
    run_dir = root / name
    run_dir.mkdir(parents=True)
    build_batch_plan(256, 8, 1, 0, steps, seed=1, shuffle=True).save(run_dir / "plan.npz")
    config = {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": max(1, hidden // 64), "intermediate_size": 4 * hidden, "vocab_size": 8000,
              "max_position_embeddings": 64}
    spec = RunSpec(args=args, task=TaskSpec(metrics=["accuracy"]), model=ModelSpec(config=config),
                   dataset_dir=str(data_dir), tokenizer_dir=str(root / "no-tokenizer"),
                   plan_path=str(run_dir / "plan.npz"), output_dir=str(run_dir), config_hash="bench")
    (run_dir / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    return run_dir


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    from stages.launch import free_port
    from tests.reliability.test_tracking_outage import _start_server as start  # the same server as the tests'

    port = free_port()
    return start(root, port), f"http://127.0.0.1:{port}"


def _train(run_dir: Path, uploader) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(os.cpu_count() or 1), "BENCH_STEP_CLOCK": str(run_dir / "step_clock.json")}
    env.pop("WORLD_SIZE", None)
    if uploader:
        uploader.start()
    proc = subprocess.run([sys.executable, "-m", "trainer_core.run", "--spec", str(run_dir / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ended = time.perf_counter()
    if uploader:
        uploader.close()
    times = json.loads((run_dir / "step_clock.json").read_text())
    return {"steps_per_s": (len(times) - 1) / (times[-1] - times[0]), "drain_s": time.perf_counter() - ended,
            "uploaded": uploader.uploads if uploader else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()

    import logging

    from stages.checkpoint_store import CheckpointUploader
    from stages.tracking import RunInfo, client
    from trainer_core import checkpoint as ckpt

    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-upload-"))
    (root / "server").mkdir()
    server, url = _start_server(root / "server")
    try:
        mlflow_client = client(url)
        experiment = mlflow_client.create_experiment("bench-ckpt-upload")
        results: dict[str, list[dict]] = {"off": [], "on": []}
        size_mb = 0.0
        for repeat in range(opts.repeats):
            for mode in ("off", "on"):
                run_dir = _spec(root, f"{mode}-{repeat}", opts.steps, opts.save_steps, opts.hidden, opts.layers)
                uploader = None
                if mode == "on":
                    run = RunInfo(run_id=mlflow_client.create_run(experiment).info.run_id, tracking_uri=url,
                                  experiment_id=experiment)
                    uploader = CheckpointUploader(run, f"bench-{repeat}", run_dir, logging.getLogger("bench"),
                                                  save_total_limit=2)
                results[mode].append(_train(run_dir, uploader))
                size_mb = ckpt.tree_size(ckpt.list_checkpoints(run_dir)[-1]) / 2**20
                print(mode, repeat, results[mode][-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    off, on = median("off", "steps_per_s"), median("on", "steps_per_s")
    print(f"\nrandom BERT hidden {opts.hidden} x {opts.layers} layers, {opts.steps} steps x batch 8 x 32 tokens, "
          f"a checkpoint every {opts.save_steps} steps ({size_mb:.1f} MiB each), {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), median of {opts.repeats}\n")
    print("| checkpoint upload | training steps/s | checkpoints uploaded | drain after training (s) |")
    print("|---|---:|---:|---:|")
    print(f"| off (tracking.log_checkpoints=false) | {off:.2f} | 0 | - |")
    print(f"| on (default) | {on:.2f} | {median('on', 'uploaded'):.0f} | {median('on', 'drain_s'):.1f} |")
    print(f"\nslowdown: {100 * (1 - on / off):+.1f} % steps/s")


if __name__ == "__main__":
    main()
