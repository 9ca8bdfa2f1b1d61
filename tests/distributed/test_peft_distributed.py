"""LoRA (peft=lora) on 2 gloo ranks: DDP, FSDP2 and DeepSpeed ZeRO-2/3 train what 1 process trains.

The run of tests/distributed (37 samples, global micro-batch 8, 2 accumulation steps, 6 steps, checkpoints at 3
and 6) with LoRA r=4 on every Linear of the tiny BERT and the classifier trained in full (modules_to_save). All runs
start from one saved pretrained folder (under ZeRO-3 the model is built already partitioned, a random init per
partition would start elsewhere) and seed the adapters alike on every rank. lora_dropout is 0: a dropout mask drawn
per rank differs from the one 1 process draws. Tolerances are test_equivalence's (atol 1e-5 on every logged value,
5e-5 on every weight): as for a full fine-tune only the float32 summation order of the reduction differs.

Every topology's checkpoints hold the trained tensors only (adapters + head, and their optimizer state), and a
killed 2-rank run resumes bitwise equal to the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stages.launch import distributed_spec
from tests.distributed.helpers import hardware_of, launch, make_spec, metrics, metrics_of
from tests.distributed.test_deepspeed import _exp_avg_numel
from tests.distributed.test_equivalence import ATOL, WEIGHT_ATOL
from trainer_core import zero
from trainer_core.spec import ModelSpec

pytestmark = pytest.mark.integration

LORA = dict(method="lora", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["all-linear"], modules_to_save=[],
            use_rslora=False, init_lora_weights=True, use_dora=False, load_in_4bit=False)
HARDWARE = {
    "cpu": ["hardware=cpu"],
    "ddp": ["hardware=ddp_2cpu"],
    "fsdp": ["hardware=fsdp_2gpu", "hardware.use_cpu=true"],
    "zero2": ["hardware=deepspeed_zero2", "hardware.use_cpu=true"],
    "zero3": ["hardware=deepspeed_zero3", "hardware.use_cpu=true"],
}
KILLED = ("ddp", "fsdp", "zero3")  # ZeRO-2 resumes through the same zero.load as ZeRO-3
ADAPTER = Path("final") / "adapter" / "adapter_model.safetensors"


def _trained(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def _lora_spec(root: Path, name: str, hardware: str, **changes):
    world = 1 if hardware == "cpu" else 2
    distributed = distributed_spec(hardware_of(HARDWARE[hardware])) if hardware == "fsdp" else None
    spec, path = make_spec(root, name, world, distributed=distributed, log_level_replica="warning", **changes)
    spec = dataclasses.replace(spec, peft=dict(LORA), model=ModelSpec(name_or_path=str(root / "init"), dropout=0.0))
    path.write_text(spec.to_json())
    return spec, path


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """The 1-process LoRA run, the 2-rank ones, and 2-rank runs killed in step 5 (all started at once)."""
    from tests.distributed.helpers import _spec
    from trainer_core.tasks import get_task

    root = tmp_path_factory.mktemp("peft")
    base_spec, _ = _spec(root, "base", world_size=1)
    torch.manual_seed(0)
    get_task(base_spec.task.family)(base_spec.task).build_model(base_spec.model).save_pretrained(root / "init")
    runs = {hw: _lora_spec(root, hw, hw) for hw in HARDWARE}
    killed = {hw: _lora_spec(root, f"killed-{hw}", hw, record=False, kill_at=4) for hw in KILLED}
    procs = {hw: launch(HARDWARE[hw], path, background=True) for hw, (_, path) in runs.items()}
    procs |= {f"killed-{hw}": launch(HARDWARE[hw], path, background=True) for hw, (_, path) in killed.items()}
    logs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    for hw in HARDWARE:
        assert procs[hw].returncode == 0, (hw, logs[hw][-4000:])
    for hw in KILLED:
        assert procs[f"killed-{hw}"].returncode not in (0, None), logs[f"killed-{hw}"][-4000:]
    return runs, logs, root


def _assert_close_run(got_spec, ref_spec) -> None:
    got, ref = metrics(got_spec), metrics(ref_spec)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 3, 4, 5, 6, 6]
    for a, b in zip(got, ref, strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in b["metrics"].items():
            assert a["metrics"][key] == pytest.approx(value, abs=ATOL), (b["step"], key)
    for file in (ADAPTER, Path("final") / "model.safetensors"):
        w_got = load_file(str(Path(got_spec.output_dir) / file))
        w_ref = load_file(str(Path(ref_spec.output_dir) / file))
        assert w_got.keys() == w_ref.keys()
        for name, value in w_ref.items():
            torch.testing.assert_close(w_got[name], value, atol=WEIGHT_ATOL, rtol=0, msg=f"{file}: {name}")


def _checkpoint_names(step: Path) -> set[str]:
    """The tensor names of the trainer's weight files in a step folder (model.safetensors or its shards)."""
    names: set[str] = set()
    for file in step.glob("model*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("hardware", ["ddp", "fsdp", "zero2", "zero3"])
def test_lora_on_2_ranks_trains_what_1_process_trains(lora_runs, hardware):
    runs, logs, _ = lora_runs
    spec, _ = runs[hardware]
    log = logs[hardware]
    assert "[rank 0] INFO trainer_core: rank 0/2: world_size=2 per_device_train_batch_size=4" in log
    assert re.search(r"final/: LoRA merged into the base; adapter alone in .*\(r=4", log), log[-3000:]
    losses = [r["metrics"]["loss"] for r in metrics(spec) if "loss" in r["metrics"]]
    assert losses[-1] < losses[0]
    _assert_close_run(spec, runs["cpu"][0])

    # the adapters did train (B starts at 0), the merged final/ is a plain model with the base's names
    adapter = load_file(str(Path(spec.output_dir) / ADAPTER))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    final = load_file(str(Path(spec.output_dir) / "final" / "model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k for k in final)
    base = load_file(str(Path(spec.output_dir).parents[1] / "init" / "model.safetensors"))
    assert final.keys() == base.keys()

    # checkpoints: the trained tensors only (adapters + head) and, for them only, the optimizer state
    step = Path(spec.output_dir) / "checkpoints" / "step-00000006"
    one = load_file(str(Path(runs["cpu"][0].output_dir) / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert one and all(_trained(k) for k in one)
    assert _checkpoint_names(step) == set(one)
    trained = sum(v.numel() for v in one.values())
    if hardware == "fsdp":  # optimizer shards: Adam's state of the trained tensors only ("state/<name>/<key>")
        for rank in (0, 1):
            with safe_open(str(step / f"optimizer_shard_{rank}.safetensors"), framework="pt") as f:
                assert {k.split("/")[1] for k in f.keys()} == set(one)  # noqa: SIM118
    if hardware.startswith("zero"):
        # DeepSpeed's own files: Adam moments of the trained tensors only, partitioned over the ranks, and no
        # copy of the frozen base in its module states
        moments = sum(_exp_avg_numel(zero.safe_load(step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
                      for rank in (0, 1))
        assert trained <= moments <= trained + 16, (moments, trained)  # ZeRO pads a partition by a few elements
        base_bytes = 4 * sum(v.numel() for v in base.values())
        assert all(p.stat().st_size < base_bytes / 2 for p in step.glob("*model_states.pt"))


@pytest.mark.parametrize("hardware", KILLED)
def test_killed_lora_run_on_2_ranks_resumes_bitwise_equal(lora_runs, hardware):
    runs, _, root = lora_runs
    ref_spec = runs[hardware][0]
    out = root / f"killed-{hardware}" / "out"
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    _, path = _lora_spec(root, f"killed-{hardware}", hardware, record=False)  # the relaunch: no kill
    relaunch = launch(HARDWARE[hardware], path)
    log = relaunch.stdout + relaunch.stderr
    assert relaunch.returncode == 0, log[-4000:]
    assert "Resuming from checkpoint" in log and "step-00000003" in log
    for file in (ADAPTER, Path("final") / "model.safetensors"):
        ref = load_file(str(Path(ref_spec.output_dir) / file))
        got = load_file(str(out / file))
        assert ref.keys() == got.keys()
        for name, value in ref.items():
            assert torch.equal(got[name], value), (file, name)
    assert [r["metrics"] for r in metrics_of(out)] == [r["metrics"] for r in metrics(ref_spec)]
