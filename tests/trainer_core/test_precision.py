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


def test_bf16_full_eval_scores_a_finished_model_in_bf16_weights(tmp_path) -> None:
    import numpy as np
    import torch

    from tests.trainer_core.factories import make_trainer

    full = make_trainer(tmp_path / "bf16", eval_n=13, bf16_full_eval=True)
    plain = make_trainer(tmp_path / "fp32", eval_n=13)  # the same weights (seeded), fp32
    got, want = full.predict(full.eval_dataset), plain.predict(plain.eval_dataset)
    assert {p.dtype for p in full.accelerator.unwrap_model(full.model).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in plain.accelerator.unwrap_model(plain.model).parameters()} == {torch.float32}
    assert got.predictions.shape == want.predictions.shape == (13, 2)
    assert not np.array_equal(got.predictions, want.predictions)  # computed in bf16 ...
    np.testing.assert_allclose(got.predictions, want.predictions, atol=0.05)  # ... to bf16's precision
    assert got.metrics.keys() == want.metrics.keys()


def test_bf16_full_eval_leaves_training_and_its_evaluations_alone(tmp_path) -> None:
    import torch

    from tests.trainer_core.factories import make_trainer

    runs = {}
    for flag in (False, True):
        trainer = make_trainer(tmp_path / str(flag), bf16_full_eval=flag, eval_strategy="steps", eval_steps=3)
        trainer.train()
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        runs[flag] = {name: tensor.clone() for name, tensor in weights.items()}, evaluations
    (weights, evaluations), (weights_off, evaluations_off) = runs[True], runs[False]
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert all(torch.equal(weights[name], weights_off[name]) for name in weights_off)  # bit for bit
    assert [entry["step"] for entry in evaluations] == [3, 6]
    assert evaluations == evaluations_off


def test_bf16_full_eval_where_bf16_cannot_run_is_refused_with_the_fix(monkeypatch, tmp_path) -> None:
    from tests.trainer_core.factories import make_trainer

    monkeypatch.setattr(precision, "bf16_supported", lambda: False)  # a GPU older than Ampere
    with pytest.raises(ValueError, match=r"trainer.bf16_full_eval=true: this GPU has no bf16 .* set "
                                         r"trainer.bf16_full_eval=false"):
        make_trainer(tmp_path, bf16_full_eval=True)
    assert make_trainer(tmp_path, bf16_full_eval=False).args.bf16_full_eval is False
