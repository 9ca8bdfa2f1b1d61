"""hardware=deepspeed_zero2 / deepspeed_zero3 with hardware.use_cpu=true: DeepSpeed ZeRO on 2 gloo processes.

The same run as tests/distributed (37 samples, global micro-batch 8, 2 accumulation steps with a short last
window per epoch, 6 steps), started from the weights the reference runs start from (saved once as a pretrained
folder: under ZeRO-3 with zero3_init_flag the model is built already partitioned, and a random init drawn per
partition would start elsewhere). DeepSpeed computes the gradient the DDP reference computes, so the tolerances
of test_equivalence hold; a kill and relaunch through DeepSpeed's partitioned checkpoint is bitwise identical.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.distributed.helpers import assert_relaunch_equals, launch, make_spec, metrics, read_records
from tests.distributed.test_equivalence import assert_same_run
from trainer_core import checkpoint as ckpt
from trainer_core import zero
from trainer_core.spec import ModelSpec

ZERO2 = ["hardware=deepspeed_zero2", "hardware.use_cpu=true"]
ZERO3 = ["hardware=deepspeed_zero3", "hardware.use_cpu=true"]


def _exp_avg_numel(obj) -> int:
    """Elements of every Adam first moment in a (nested) DeepSpeed optimizer state."""
    if isinstance(obj, dict):
        return sum(v.numel() if k == "exp_avg" and isinstance(v, torch.Tensor) else _exp_avg_numel(v)
                   for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sum(_exp_avg_numel(v) for v in obj)
    return 0


def _spec_from(pretrained: Path, root: Path, name: str, **changes):
    spec, path = make_spec(root, name, 2, log_level_replica="warning", **changes)
    spec = dataclasses.replace(spec, model=ModelSpec(name_or_path=str(pretrained), dropout=0.0))
    path.write_text(spec.to_json())
    return spec, path


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory, reference_runs):
    """ZeRO-2 and ZeRO-3 runs, and alongside them (to save wall time) a ZeRO-2 run killed in step 5 and a ZeRO-3
    run that loads its best checkpoint at the end."""
    from transformers import set_seed

    from trainer_core.tasks import get_task

    root = tmp_path_factory.mktemp("deepspeed")
    ref_spec = reference_runs[2][0]
    set_seed(ref_spec.args.seed)  # what trainer_core.run does before building the model
    get_task(ref_spec.task.family)(ref_spec.task).build_model(ref_spec.model).save_pretrained(root / "init")
    runs = {"zero2": _spec_from(root / "init", root, "zero2"), "zero3": _spec_from(root / "init", root, "zero3")}
    _, killed_path = _spec_from(root / "init", root, "killed", record=False, kill_at=4)
    # "best" = the higher eval loss, i.e. step 3's checkpoint (6 steps, evaluated and saved at 3 and 6)
    runs["best"] = _spec_from(root / "init", root, "best", record=False, load_best_model_at_end=True,
                              metric_for_best_model="loss", greater_is_better=True)
    procs = {"zero2": launch(ZERO2, runs["zero2"][1], background=True),
             "zero3": launch(ZERO3, runs["zero3"][1], background=True),
             "killed": launch(ZERO2, killed_path, background=True),
             "best": launch(ZERO3, runs["best"][1], background=True)}
    logs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name in ("zero2", "zero3", "best"):
        assert procs[name].returncode == 0, logs[name][-4000:]
    assert procs["killed"].returncode not in (0, None), logs["killed"][-4000:]
    return runs, logs, root


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_partitions_and_trains_like_ddp(deepspeed_runs, reference_runs, stage):
    runs, logs, _ = deepspeed_runs
    spec, path = runs[f"zero{stage}"]
    launcher = yaml.safe_load((path.parent / "accelerate.yaml").read_text())
    assert launcher["distributed_type"] == "DEEPSPEED" and launcher["deepspeed_config"]["zero_stage"] == stage
    assert launcher["use_cpu"] is False  # Accelerate's use_cpu would switch DeepSpeed off
    log = logs[f"zero{stage}"]
    assert "[rank 0] INFO trainer_core: rank 0/2: world_size=2 per_device_train_batch_size=4" in log
    assert "[rank 1] INFO" not in log  # replicas at log_level_replica=warning

    # the DDP reference's losses, grad norms, eval metrics and final weights (test_equivalence's tolerances)
    assert_same_run(spec, reference_runs[2][0])

    # ZeRO-3: each rank holds half of every parameter from the start (zero3_init_flag: built partitioned)
    params = [r for r in read_records(path.parent / "samples-ws2") if r["event"] == "params"]
    total = params[0]["total"]
    for r in params:
        held = r["local"] if stage == 3 else total
        assert abs(held - (total / 2 if stage == 3 else total)) <= 0.02 * total, r

    # the optimizer state is partitioned: one DeepSpeed file per rank holding about half of the Adam moments,
    # readable with torch.load(weights_only=True) (nothing in the step folder needs a full unpickler)
    step6 = Path(spec.output_dir) / "checkpoints" / "step-00000006"
    names = sorted(p.name for p in step6.iterdir())
    assert [n for n in names if zero.OPTIM_FILE.match(n)] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "optimizer.pt" not in names and "model.safetensors" in names
    assert ckpt.unsafe_files(step6) == []
    for rank in (0, 1):
        moments = _exp_avg_numel(zero.safe_load(step6 / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        assert abs(moments - total / 2) <= 0.02 * total, (rank, moments, total)

    # final/ holds the full model (ZeRO-3: gathered once at the end), equal to the last checkpoint's weights
    final = load_file(str(Path(spec.output_dir) / "final" / "model.safetensors"))
    last = load_file(str(step6 / "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(v, last[k]) for k, v in final.items())


@pytest.mark.integration
def test_deepspeed_kill_and_resume_equals_uninterrupted(deepspeed_runs):
    runs, _, root = deepspeed_runs
    ref_spec = runs["zero2"][0]
    _, path = _spec_from(root / "init", root, "killed", record=False)  # the relaunch: same run folder, no kill
    assert_relaunch_equals(ZERO2, path, root / "killed" / "out", ref_spec)


def test_deepspeed_files_load_weights_only(tmp_path):
    """DeepSpeed's loss scaler and stage enum load; any other class in a checkpoint file is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                "state": {0: {"exp_avg": torch.ones(3)}}}, good)
    loaded = zero.safe_load(good)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["state"][0]["exp_avg"], torch.ones(3))
    bad = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"when": datetime.date(2026, 1, 1)}, bad)  # any class outside the allow-list
    with pytest.raises(pickle.UnpicklingError, match="datetime"):
        zero.safe_load(bad)
    assert zero.saved_world_size(tmp_path) == 2


@pytest.mark.integration
def test_deepspeed_zero3_loads_the_best_checkpoint_at_the_end(deepspeed_runs):
    """Under ZeRO-3 the weights are partitioned: the best checkpoint comes back through the engine, and final/
    is that checkpoint's model, not the last step's."""
    runs, logs, _ = deepspeed_runs
    spec, _ = runs["best"]
    evals = {r["step"]: r["metrics"]["eval_loss"] for r in metrics(spec) if "eval_loss" in r["metrics"]}
    assert evals[3] > evals[6]  # so the best (greater_is_better) is step 3, not the last
    out = Path(spec.output_dir)
    assert "Loading best model from" in logs["best"] and "step-00000003" in logs["best"]
    final = load_file(str(out / "final" / "model.safetensors"))
    best = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all(torch.equal(v, best[k]) for k, v in final.items())
    assert not all(torch.equal(v, last[k]) for k, v in final.items())
