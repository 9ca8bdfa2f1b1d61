"""trainer.mixed_precision=auto: bf16 only where the platform reports native bf16, else fp32; the choice is logged
with the run's params and pinned when a version is reproduced."""

from __future__ import annotations

import pytest

from trainer_core import precision

NATIVE = {"avx512_bf16": True, "amx_bf16": False}
EMULATED = {"avx512_bf16": False, "amx_bf16": False}


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("FINETUNE_MIXED_PRECISION", raising=False)  # the conf/ default: auto


def test_auto_agrees_with_what_torch_reports_of_this_cpu() -> None:
    import torch

    probe = dict(torch._C._cpu._get_cpu_capability())  # what torch's kernels dispatch on
    native = bool(probe.get("avx512_bf16") or probe.get("amx_bf16"))
    assert precision.cpu_flags() == {flag: bool(probe.get(flag)) for flag in precision.BF16_FLAGS}
    assert (precision.native_bf16() is not None) == native
    assert precision.resolve("auto")[0] == ("bf16" if native else "no")


@pytest.mark.parametrize("flags, expected", [
    (NATIVE, "bf16"), ({"amx_bf16": True}, "bf16"), (EMULATED, "no"), ({}, "no"),
])
def test_auto_is_bf16_only_with_native_support(monkeypatch, flags, expected) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    value, why = precision.resolve("auto")
    assert value == expected
    assert ("natively" in why) == (expected == "bf16")
    assert precision.resolve("no") == ("no", "asked for")  # an explicit setting is never second-guessed


def test_auto_on_a_gpu_config_without_cuda_is_fp32(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(precision, "cpu_flags", lambda: NATIVE)  # the CPU's bf16 does not count for a GPU run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve("auto", use_cpu=False)[0] == "no"


@pytest.mark.parametrize("flags, expected", [(NATIVE, "bf16"), (EMULATED, "no")])
def test_the_flow_config_resolves_auto_and_records_why(monkeypatch, tmp_path, flags, expected) -> None:
    from flows.config import compose

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    cfg = compose([f"paths.root={tmp_path}"])
    assert cfg.trainer.mixed_precision == expected
    assert cfg.auto["trainer.mixed_precision"].startswith(f"{expected} (")
    asked = compose([f"paths.root={tmp_path}", "trainer.mixed_precision=no"])
    assert asked.trainer.mixed_precision == "no" and asked.auto == {}
    fsdp = compose([f"paths.root={tmp_path}", "hardware=fsdp_2gpu"])
    assert fsdp.trainer.mixed_precision == "bf16" and fsdp.auto["trainer.mixed_precision"] == "bf16 (hardware=fsdp_2gpu)"


def test_the_choice_is_a_param_of_the_mlflow_run(monkeypatch, tmp_path) -> None:
    from flows.config import compose
    from stages.tracking import client, open_run

    monkeypatch.setattr(precision, "cpu_flags", lambda: NATIVE)
    cfg = compose([f"paths.root={tmp_path}"])
    run = open_run(cfg, flow_run_id="precision-test")
    params = client(run.tracking_uri).get_run(run.run_id).data.params
    assert params["trainer.mixed_precision"] == "bf16"
    assert params["auto.trainer.mixed_precision"] == "bf16 (CPU avx512_bf16 runs bf16 natively)"


@pytest.mark.parametrize("flags, expected", [(NATIVE, "bf16"), (EMULATED, "no")])
def test_an_in_process_trainer_resolves_auto_too(monkeypatch, tmp_path, flags, expected) -> None:
    from tests.trainer_core.factories import make_trainer

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    trainer = make_trainer(tmp_path, mixed_precision="auto")
    assert trainer.args.mixed_precision == expected
    assert str(trainer.accelerator.mixed_precision) == expected


def test_a_replay_pins_what_the_version_was_trained_with() -> None:
    from stages.lineage import Recorded, replay_overrides

    pinned = {"trainer.mixed_precision": "bf16", "trainer.optim": "adamw_torch"}
    recorded = Recorded("sqlite://", "m", "1", ["trainer.learning_rate=1e-4"], {}, pinned)
    assert replay_overrides(recorded, []) == ["trainer.learning_rate=1e-4", "trainer.mixed_precision=bf16",
                                              "trainer.optim=adamw_torch"]
    mine = replay_overrides(recorded, ["trainer.mixed_precision=no"])
    assert mine[-1] == "trainer.mixed_precision=no" and "trainer.mixed_precision=bf16" not in mine
