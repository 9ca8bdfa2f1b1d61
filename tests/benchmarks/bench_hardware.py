"""Benchmark: the same run on every CPU topology, side by side (1 process, DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3).

    .venv/bin/python tests/benchmarks/bench_hardware.py                 # 40 steps, a 4-layer 256-wide BERT
    .venv/bin/python tests/benchmarks/bench_hardware.py --steps 80 --repeats 2

Each topology is launched the way the train stage launches it (hardware group -> accelerate YAML ->
`accelerate launch -m trainer_core.run`), one after another on an otherwise idle machine, with the same global
batch (8 samples x 2 accumulation steps) and the same weights. Prints, per topology: launch-to-exit wall time
(start-up included: DeepSpeed's import and op loading show there) and the median training step time (from the
rank-0 log timestamps of steps 2..N), plus the final loss (all topologies compute the same run).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.launch import distributed_spec  # noqa: E402
from tests.distributed.helpers import hardware_of, launch, make_spec, metrics  # noqa: E402
from trainer_core.data import build_batch_plan  # noqa: E402
from trainer_core.spec import ModelSpec  # noqa: E402

TOPOLOGIES = {
    "cpu (1 process)": (["hardware=cpu"], 1),
    "ddp_2cpu": (["hardware=ddp_2cpu"], 2),
    "fsdp2 (2 ranks)": (["hardware=fsdp_2gpu", "hardware.use_cpu=true"], 2),
    "deepspeed_zero2 (2 ranks)": (["hardware=deepspeed_zero2", "hardware.use_cpu=true"], 2),
    "deepspeed_zero3 (2 ranks)": (["hardware=deepspeed_zero3", "hardware.use_cpu=true"], 2),
}
MODEL = {"model_type": "bert", "vocab_size": 128, "hidden_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 64}
STEP_LINE = re.compile(r"^(\S+ \S+) \[rank 0\] INFO trainer_core: step (\d+): ")


def step_seconds(log: str) -> list[float]:
    stamps = {}
    for line in log.splitlines():
        match = STEP_LINE.search(line)
        if match:
            stamps[int(match.group(2))] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    steps = sorted(stamps)
    return [(stamps[b] - stamps[a]).total_seconds() for a, b in zip(steps[1:], steps[2:], strict=False)]


def run_once(root: Path, name: str, overrides: list[str], world: int, steps: int) -> tuple[float, float, float]:
    distributed = distributed_spec(hardware_of(overrides)) if "fsdp" in name else None
    spec, path = make_spec(root, name.split()[0], world, distributed=distributed, record=False, max_steps=steps,
                           eval_strategy="no", save_strategy="no", log_level_replica="warning")
    build_batch_plan(37, 8, 2, 0, steps, seed=5).save(spec.plan_path)
    spec = dataclasses.replace(spec, model=ModelSpec(config=dict(MODEL), dropout=0.0))
    path.write_text(spec.to_json())
    start = time.perf_counter()
    done = launch(overrides, path)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    loss = [r["metrics"]["loss"] for r in metrics(spec) if "loss" in r["metrics"]][-1]
    return wall, statistics.median(step_seconds(done.stdout + done.stderr)), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    cli = parser.parse_args()
    print(f"{cli.steps} steps x global batch 16 (8 x 2 accumulation), BERT 4 x 256, fp32, CPU")
    print(f"{'topology':28} {'wall s':>8} {'s/step':>8} {'final loss':>11}")
    for name, (overrides, world) in TOPOLOGIES.items():
        for repeat in range(cli.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                wall, per_step, loss = run_once(Path(tmp), name, overrides, world, cli.steps)
            print(f"{name:28} {wall:8.1f} {per_step:8.3f} {loss:11.6f}" + (f"  (repeat {repeat + 1})" if repeat else ""),
                  flush=True)


if __name__ == "__main__":
    main()
