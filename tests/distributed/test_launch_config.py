"""What the launcher makes of FSDP and multi-node on CPU (fast: no process started)."""

from __future__ import annotations

from tests.distributed.helpers import hardware_of


def test_fsdp_on_cpu_starts_plain_gloo_ranks_and_tells_trainer_core(tmp_path):
    from stages.launch import accelerate_config, distributed_spec, launch_command

    hardware = hardware_of(["hardware=fsdp_2gpu", "hardware.use_cpu=true"])
    config = accelerate_config(hardware)
    # Accelerate's FSDP plugin would silently be DDP on CPU: the multi-GPU launcher + ACCELERATE_USE_CPU instead
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2
    _, env = launch_command(hardware, tmp_path / "a.yaml", ["-m", "trainer_core.run"])
    assert env["ACCELERATE_USE_CPU"] == "true"
    spec = distributed_spec(hardware)
    assert spec["distributed_type"] == "FSDP"
    assert spec["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # on GPUs too (Accelerate's FSDP2 cannot prepare the model without its optimizer): plain ranks, trainer_core
    # shards; the YAML keeps the request as a record
    gpu = accelerate_config(hardware_of(["hardware=fsdp_2gpu"]))
    assert gpu["distributed_type"] == "MULTI_GPU" and gpu["fsdp_config"]["fsdp_version"] == 2


def test_multinode_on_cpu_is_one_launch_per_machine(monkeypatch):
    from stages.launch import accelerate_config

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("NUM_MACHINES", "2")
    monkeypatch.setenv("GPUS_PER_MACHINE", "1")
    for rank in (0, 1):
        monkeypatch.setenv("MACHINE_RANK", str(rank))
        config = accelerate_config(hardware_of(["hardware=multinode", "hardware.use_cpu=true"]))
        assert config["distributed_type"] == "MULTI_GPU"  # + ACCELERATE_USE_CPU: real gloo ranks
        assert (config["num_machines"], config["num_processes"], config["machine_rank"]) == (2, 2, rank)
        assert (config["main_process_ip"], config["main_process_port"]) == ("127.0.0.1", 29555)
