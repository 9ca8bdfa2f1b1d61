"""The hardware group: every variant composes into a valid accelerate launch YAML; impossible ones are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from flows.config import CONF_DIR, compose
from stages.launch import accelerate_config, launch_command, preflight, write_accelerate_config
from stages.schema import ConfigError

HARDWARE = sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))


def test_the_issue_s_hardware_variants_ship() -> None:
    assert {"cpu", "ddp_2cpu", "gpu", "ddp_2gpu", "ddp_8gpu", "fsdp_2gpu", "fsdp_8gpu_offload", "deepspeed_zero2",
            "deepspeed_zero3", "multinode"} <= set(HARDWARE)


@pytest.mark.parametrize("name", HARDWARE)
def test_every_variant_makes_a_valid_accelerate_yaml(tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    cfg = compose([f"hardware={name}"])
    path = write_accelerate_config(cfg.hardware, tmp_path / "accelerate.yaml", cfg.trainer.mixed_precision)
    loaded = load_config_from_file(str(path))  # accelerate's own parser: unknown keys or bad values fail here
    assert loaded.num_processes == cfg.hardware.num_processes
    assert loaded.num_machines == cfg.hardware.num_machines
    assert str(loaded.mixed_precision) == cfg.trainer.mixed_precision
    raw = yaml.safe_load(path.read_text())
    if cfg.hardware.distributed_type == "FSDP":
        assert raw["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert cfg.trainer.mixed_precision == "bf16"
    if cfg.hardware.distributed_type == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] in (2, 3)


def test_cpu_ddp_uses_the_launcher_that_really_starts_two_ranks(tmp_path: Path) -> None:
    cfg = compose(["hardware=ddp_2cpu"])
    config = accelerate_config(cfg.hardware)
    # a MULTI_CPU config file (or use_cpu alone) silently gives ranks of world size 1
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2
    _, env = launch_command(cfg.hardware, tmp_path / "a.yaml", ["-m", "trainer_core.run"])
    assert env["ACCELERATE_USE_CPU"] == "true" and int(env["OMP_NUM_THREADS"]) >= 1


def test_the_launch_is_accelerates_launch_command_run_by_this_interpreter(tmp_path: Path) -> None:
    from accelerate.commands.launch import launch_command_parser

    cfg = compose(["hardware=ddp_2cpu"])
    cmd, _ = launch_command(cfg.hardware, tmp_path / "a.yaml", ["-m", "trainer_core.run", "--spec", "s.json"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]  # not the `accelerate` entry point
    args = launch_command_parser().parse_args(cmd[3:])  # what `accelerate launch` parses
    assert args.config_file == str(tmp_path / "a.yaml")
    assert args.module and args.training_script == "trainer_core.run" and args.training_script_args == ["--spec", "s.json"]


def test_variants_list_only_what_differs_from_their_base() -> None:
    variant = yaml.safe_load((CONF_DIR / "hardware" / "fsdp_8gpu_offload.yaml").read_text())
    base = yaml.safe_load((CONF_DIR / "hardware" / "fsdp_2gpu.yaml").read_text())
    assert "fsdp_2gpu" in variant["defaults"]
    # only the keys that differ are repeated, and each of them really differs
    assert set(variant["fsdp_config"]) == {"fsdp_offload_params"}
    assert all(variant[key] != base.get(key) for key in variant if key not in ("defaults", "fsdp_config"))
    # composed, the variant still has the base's wrapping policy
    composed = compose(["hardware=fsdp_8gpu_offload"]).hardware.fsdp_config
    assert composed["fsdp_auto_wrap_policy"] == base["fsdp_config"]["fsdp_auto_wrap_policy"]
    assert composed["fsdp_offload_params"] is True


def test_multinode_reads_the_topology_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NODEID", "3")
    monkeypatch.setenv("GPUS_PER_MACHINE", "8")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29511")
    hw = compose(["hardware=multinode"]).hardware
    assert (hw.num_machines, hw.machine_rank, hw.num_processes) == (4, 3, 32)
    assert (hw.main_process_ip, hw.main_process_port) == ("10.0.0.7", 29511)


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["hardware=fsdp_2gpu"], ["hardware=fsdp_2gpu needs 2 GPU(s)", "hardware=cpu"]),
        (["hardware=gpu"], ["hardware=gpu needs 1 GPU(s)"]),
        (["hardware=multinode", "hardware.use_cpu=true"], ["num_machines=2 needs the rendezvous address", "MASTER_ADDR"]),
    ],
)
def test_preflight_refuses_what_this_machine_cannot_do(monkeypatch, overrides, fragments) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as info:
        preflight(cfg.hardware, cfg.trainer.mixed_precision)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_preflight_refuses_bf16_full_eval_on_a_gpu_without_bf16(monkeypatch) -> None:
    import torch

    from trainer_core import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)  # e.g. a V100 or a T4
    cfg = compose(["hardware=gpu", "trainer.mixed_precision=no", "trainer.bf16_full_eval=true"])
    with pytest.raises(ConfigError, match=r"hardware=gpu: trainer.bf16_full_eval=true: this GPU has no bf16"):
        preflight(cfg.hardware, cfg.trainer.mixed_precision, cfg.trainer.bf16_full_eval)
    preflight(cfg.hardware, "no", False)  # the same GPU in fp32 throughout: nothing to refuse


def test_deepspeed_missing_is_refused_before_launch(monkeypatch) -> None:
    """A machine without DeepSpeed (dev installs have it): the preflight names the key and what to do."""
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # how Python marks a module as not importable
    cfg = compose(["hardware=deepspeed_zero2", "hardware.use_cpu=true"])
    with pytest.raises(ConfigError, match=r"hardware=deepspeed_zero2 needs DeepSpeed, which is not installed.*"
                                          r"\[deepspeed\]"):
        preflight(cfg.hardware, "no")
