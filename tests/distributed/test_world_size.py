"""Resume on a different world size: killed with 2 processes, relaunched with 1 (and the reverse).

The batch plan fixes the global micro-batch G = 8; the relaunch doubles (halves) per_device_train_batch_size
so per_device × world stays 8, and resumes at the checkpoint's global step, i.e. the same plan row. What is
restored: model, optimizer, scheduler, trainer state and data cursor (all world-size independent); RNG per rank
where the checkpoint has that rank's file, a (seed, step, rank)-seeded torch generator for a new rank. The runs
use dropout 0, so the RNG does not enter the comparison.

Tolerance: as in test_equivalence (atol 1e-5 on logged values, 5e-5 on weights) against the uninterrupted
run of each world size (the shared reference runs): same batches, only the float32 summation order differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.helpers import launch, make_spec, read_records
from tests.distributed.test_equivalence import assert_same_run

pytestmark = pytest.mark.integration
HARDWARE = {1: ["hardware=cpu"], 2: ["hardware=ddp_2cpu"]}
CHECKPOINT = 3  # the kill comes in the middle of step 5's window; the last checkpoint is step 3


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_keeps_the_global_batch(reference_runs, tmp_path, before, after):
    _, killed_path = make_spec(tmp_path, "run", before, kill_at=4)
    killed = launch(HARDWARE[before], killed_path)
    assert killed.returncode != 0
    spec, path = make_spec(tmp_path, "run", after)  # same run folder, per-device batch 8 // after
    assert spec.args.per_device_train_batch_size * after == 8
    relaunch = launch(HARDWARE[after], path)
    log = relaunch.stdout + relaunch.stderr
    assert relaunch.returncode == 0, log[-4000:]
    assert f"Resuming from checkpoint {spec.output_dir}/checkpoints/step-{CHECKPOINT:08d}" in log
    assert f"was written by {before} rank(s), this run has {after}" in log
    assert f"world_size={after} per_device_train_batch_size={8 // after}" in log

    # steps 1-3 were trained at the old world size, 4-6 at the new one: all match the uninterrupted references
    assert_same_run(spec, reference_runs[before][0], steps={1, 2, 3})
    assert_same_run(spec, reference_runs[after][0], steps={4, 5, 6})

    # what each rank trained on: the old run up to the checkpoint (later steps were rolled back), then the new
    records = read_records(Path(spec.output_dir).parent / f"samples-ws{before}")
    kept = [r for r in records if r["event"] == "step" and r["step"] <= CHECKPOINT]
    resumed = [r for r in read_records(Path(spec.output_dir).parent / f"samples-ws{after}") if r["event"] == "step"]
    assert {r["rank"] for r in kept} == set(range(before)) and {r["rank"] for r in resumed} == set(range(after))
    assert min(r["step"] for r in resumed) == CHECKPOINT + 1
    seen: dict[int, list[int]] = {0: [], 1: []}  # epoch -> samples; 5 micro-batches of 8 (37 samples) per epoch
    for r in kept + resumed:
        for mb, indices in r["micro_batches"]:
            seen[mb // 5] += indices
    for epoch, samples in seen.items():
        assert sorted(samples) == list(range(37)), f"epoch {epoch}: a sample seen twice or skipped"


def test_fsdp_checkpoint_resumes_on_one_process(reference_runs, tmp_path):
    """2 FSDP ranks killed in step 5, relaunched as 1 plain process (a lost GPU): the shards are read whole,
    model and optimizer, and the run goes on like the 1-process reference."""
    from stages.launch import distributed_spec
    from tests.distributed.helpers import hardware_of

    fsdp = ["hardware=fsdp_2gpu", "hardware.use_cpu=true"]
    _, killed_path = make_spec(tmp_path, "run", 2, distributed=distributed_spec(hardware_of(fsdp)), kill_at=4)
    assert launch(fsdp, killed_path).returncode != 0
    step = Path(killed_path.parent) / "out" / "checkpoints" / f"step-{CHECKPOINT:08d}"
    assert (step / "optimizer_shard_1.safetensors").exists() and not (step / "optimizer.pt").exists()
    spec, path = make_spec(tmp_path, "run", 1)
    relaunch = launch(HARDWARE[1], path)
    log = relaunch.stdout + relaunch.stderr
    assert relaunch.returncode == 0, log[-4000:]
    assert f"Resuming from checkpoint {step}" in log and "was written by 2 rank(s), this run has 1" in log
    assert_same_run(spec, reference_runs[2][0], steps={1, 2, 3})  # FSDP ≡ DDP (test_fsdp)
    assert_same_run(spec, reference_runs[1][0], steps={4, 5, 6})
