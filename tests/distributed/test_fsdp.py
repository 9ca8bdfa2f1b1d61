"""hardware=fsdp_2gpu with hardware.use_cpu=true: FSDP2 really shards over 2 gloo processes on CPU.

Accelerate would silently run its FSDP plugin as DDP on CPU; the launcher starts plain gloo ranks and
trainer_core (told by RunSpec.distributed) applies fully_shard to BertEmbeddings / BertLayer, then the root.
Checkpoints are sharded (model_shard_<rank>, optimizer_shard_<rank>); final/ holds the consolidated model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from stages.launch import distributed_spec
from tests.distributed.helpers import assert_relaunch_equals, hardware_of, launch, make_spec, metrics, read_records
from tests.distributed.test_equivalence import assert_same_run
from trainer_core.fsdp2 import consolidate

FSDP_CPU = ["hardware=fsdp_2gpu", "hardware.use_cpu=true"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The uninterrupted FSDP run, and (started alongside it, to save wall time) a run killed in step 5."""
    root = tmp_path_factory.mktemp("fsdp")
    distributed = distributed_spec(hardware_of(FSDP_CPU))
    spec, path = make_spec(root, "fsdp", 2, distributed=distributed, log_level_replica="warning")
    _, killed_path = make_spec(root, "killed", 2, distributed=distributed, record=False, kill_at=4)
    procs = [launch(FSDP_CPU, path, background=True), launch(FSDP_CPU, killed_path, background=True)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[0].returncode == 0, logs[0][-4000:]
    assert procs[1].returncode not in (0, None), logs[1][-4000:]
    return spec, path, logs[0], root


@pytest.mark.integration
def test_fsdp_on_cpu_shards_the_parameters_and_trains_like_ddp(fsdp_run, reference_runs):
    spec, path, log, _ = fsdp_run
    assert json.loads(path.read_text())["distributed"]["distributed_type"] == "FSDP"
    launcher = yaml.safe_load((path.parent / "accelerate.yaml").read_text())
    assert launcher["distributed_type"] == "MULTI_GPU"  # plain gloo ranks: trainer_core shards, not Accelerate

    # each rank holds about half of every parameter: all parameters are DTensors, local shards sum to the model
    params = [r for r in read_records(path.parent / "samples-ws2") if r["event"] == "params"]
    assert sorted(r["rank"] for r in params) == [0, 1]
    total = params[0]["total"]
    assert all(r["dtensor_params"] > 0 and r["total"] == total for r in params)
    assert sum(r["local"] for r in params) == total
    for r in params:
        assert abs(r["local"] - total / 2) <= 0.02 * total, (r, total)

    # it trains: the loss goes down, and it computes what DDP computes on the same 2 ranks (tolerances of
    # test_equivalence: only the reduction order differs, reduce-scatter + all-gather instead of all-reduce)
    losses = [r["metrics"]["loss"] for r in metrics(spec) if "loss" in r["metrics"]]
    assert losses[-1] < losses[0]
    assert_same_run(spec, reference_runs[2][0])
    assert "[rank 1] INFO" not in log and "[rank 0] INFO" in log  # replicas at log_level_replica=warning

    # sharded checkpoints: one model and one optimizer shard per rank, about half the elements each, no full copy
    step6 = Path(spec.output_dir) / "checkpoints" / "step-00000006"
    names = sorted(p.name for p in step6.iterdir())
    assert names == ["manifest.json", "model_shard_0.safetensors", "model_shard_1.safetensors",
                     "optimizer_shard_0.safetensors", "optimizer_shard_1.safetensors", "rng_state_0.json",
                     "rng_state_1.json", "scheduler.pt", "trainer_state.json"]
    for rank in (0, 1):
        with safe_open(str(step6 / f"model_shard_{rank}.safetensors"), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in layout if layout[k])  # sharded tensors
        assert abs(numel - total / 2) <= 0.02 * total

    # final/ is the consolidated model, equal to a 1-process load of the last checkpoint's shards
    final = load_file(str(Path(spec.output_dir) / "final" / "model.safetensors"))
    shards = consolidate(step6)
    assert final.keys() <= shards.keys()
    for name, value in final.items():
        assert torch.equal(value, shards[name]), name
    config = json.loads((Path(spec.output_dir) / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


@pytest.mark.integration
def test_fsdp_kill_and_resume_through_the_shards_equals_uninterrupted(fsdp_run):
    ref_spec, _, _, root = fsdp_run
    # the relaunch: same run folder, without the kill
    _, path = make_spec(root, "killed", 2, distributed=distributed_spec(hardware_of(FSDP_CPU)), record=False)
    assert_relaunch_equals(FSDP_CPU, path, root / "killed" / "out", ref_spec)


@pytest.mark.gpu
@pytest.mark.integration
def test_fsdp_2gpu_trains_and_resumes_on_gpus(tmp_path):
    """trainer_core's FSDP2 on 2 GPUs over nccl (bf16 compute, fp32 master weights): trains, the loss goes down,
    a killed run resumes through the sharded checkpoint, final/ is the consolidated model."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    hardware = ["hardware=fsdp_2gpu"]
    distributed = distributed_spec(hardware_of(hardware))
    _, killed_path = make_spec(tmp_path, "run", 2, distributed=distributed, kill_at=4, mixed_precision="bf16")
    assert launch(hardware, killed_path).returncode != 0
    spec, path = make_spec(tmp_path, "run", 2, distributed=distributed, mixed_precision="bf16")
    done = launch(hardware, path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    losses = [r["metrics"]["loss"] for r in metrics(spec) if "loss" in r["metrics"]]
    assert losses[-1] < losses[0]
    step3 = Path(spec.output_dir) / "checkpoints" / "step-00000003"
    assert (step3 / "model_shard_1.safetensors").exists() and not (step3 / "model.safetensors").exists()
    final = load_file(str(Path(spec.output_dir) / "final" / "model.safetensors"))
    shards = consolidate(Path(spec.output_dir) / "checkpoints" / "step-00000006")
    assert all(torch.equal(value, shards[name]) for name, value in final.items())
