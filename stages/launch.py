"""The `hardware` config group → an accelerate launch YAML, the launch command and its environment.

    cmd, env = launch_command(hardware, config_file, ["-m", "trainer_core.run", "--spec", spec])

Two traps of accelerate 1.x on CPU handled here: `--cpu --num_processes 2` (and a config file with
distributed_type MULTI_CPU or use_cpu: true) silently starts ranks that each see world size 1. Real DDP over
gloo needs the multi-GPU launcher with ACCELERATE_USE_CPU=true in the environment.
FSDP: Accelerate's FSDP plugin would silently become DDP on CPU, and its FSDP2 cannot prepare a model without
its optimizer (which the Trainer needs), so the launcher starts plain ranks (the multi-GPU launcher; gloo on CPU,
nccl on GPU) and trainer_core shards with FSDP2 itself, told by RunSpec.distributed (`distributed_spec`); the
YAML keeps fsdp_config as a record of the request. DeepSpeed: Accelerate's own DeepSpeed launcher and plugin; on
CPU without `use_cpu` (which would switch DeepSpeed off), the ranks join gloo themselves (trainer_core.zero).
Several machines on CPU: one `accelerate launch` per machine, machine_rank 0..N-1, all
pointing at main_process_ip:main_process_port (static rendezvous), e.g. two on 127.0.0.1 to try it.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.schema import ConfigError, HardwareConfig
from trainer_core.precision import full_eval_problem, precision_problem


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_config(hardware: HardwareConfig, mixed_precision: str = "no") -> dict[str, Any]:
    """The accelerate launch YAML for this hardware (written next to the run for reproduction)."""
    distributed = hardware.distributed_type
    if hardware.use_cpu and distributed == "MULTI_CPU":
        distributed = "MULTI_GPU"  # with ACCELERATE_USE_CPU=true: the only way to get real gloo ranks
    if distributed == "FSDP" and hardware.num_processes > 1:
        distributed = "MULTI_GPU"  # plain ranks: trainer_core.distributed applies FSDP2 (see the docstring)
    deepspeed = distributed == "DEEPSPEED"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed,
        "num_processes": hardware.num_processes,
        "num_machines": hardware.num_machines,
        "machine_rank": hardware.machine_rank,
        "mixed_precision": mixed_precision,
        # DeepSpeed on CPU: Accelerate's use_cpu would switch DeepSpeed off; the ranks join a gloo group instead
        "use_cpu": hardware.use_cpu and not deepspeed,
        "rdzv_backend": hardware.rdzv_backend,
        "same_network": hardware.num_machines == 1,
        "main_training_function": "main",
        "debug": False,
    }
    if hardware.num_processes > 1 or hardware.num_machines > 1:
        config["main_process_ip"] = hardware.main_process_ip or "127.0.0.1"
        config["main_process_port"] = hardware.main_process_port or free_port()
    if hardware.gpu_ids is not None:
        config["gpu_ids"] = hardware.gpu_ids
    if hardware.distributed_type == "FSDP":
        config["fsdp_config"] = dict(hardware.fsdp_config)
    if deepspeed:
        config["deepspeed_config"] = dict(hardware.deepspeed_config)
    return config


def preflight(hardware: HardwareConfig, mixed_precision: str = "no", bf16_full_eval: bool = False) -> None:
    """Refuse hardware this machine cannot provide, before anything expensive starts."""
    errors: list[str] = []
    if hardware.use_cpu and mixed_precision == "fp16":
        errors.append(
            f"trainer.mixed_precision=fp16 needs a GPU but hardware={hardware.name} runs on the CPU: "
            "use trainer.mixed_precision=no (or bf16), or a GPU hardware config."
        )
    if not hardware.use_cpu:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local = hardware.num_processes // max(hardware.num_machines, 1)
        if visible < local:
            errors.append(
                f"hardware={hardware.name} needs {local} GPU(s) per machine but {visible} are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                f"Use hardware=cpu or hardware=ddp_2cpu here."
            )
        elif problem := precision_problem(mixed_precision):  # the GPUs are there: can they run this precision?
            errors.append(f"hardware={hardware.name}: {problem}")
        if problem := full_eval_problem(bf16_full_eval):
            errors.append(f"hardware={hardware.name}: {problem}")
    if hardware.distributed_type == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            errors.append(
                f"hardware={hardware.name} needs DeepSpeed, which is not installed: pip install -e '.[deepspeed]', "
                "or use hardware=fsdp_2gpu."
            )
    if hardware.num_machines > 1 and not hardware.main_process_ip:
        errors.append(
            f"hardware={hardware.name}: num_machines={hardware.num_machines} needs the rendezvous address: set "
            "hardware.main_process_ip (or MASTER_ADDR) and hardware.main_process_port (or MASTER_PORT)."
        )
    if errors:
        raise ConfigError("The hardware config cannot run here:\n - " + "\n - ".join(errors))


def distributed_spec(hardware: HardwareConfig) -> dict[str, Any]:
    """What trainer_core must know of the topology (RunSpec.distributed): FSDP is done by trainer_core on CPU."""
    return {"distributed_type": hardware.distributed_type, "fsdp_config": dict(hardware.fsdp_config),
            "num_machines": hardware.num_machines, "num_processes": hardware.num_processes}


def write_accelerate_config(hardware: HardwareConfig, path: Path, mixed_precision: str = "no") -> Path:
    path.write_text(yaml.safe_dump(accelerate_config(hardware, mixed_precision), sort_keys=True))
    return path


def launch_command(hardware: HardwareConfig, config_file: Path, program: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `accelerate launch --config_file ... <program>`: Accelerate's launch command run as
    `python -m accelerate.commands.launch` (what `accelerate launch` calls, without the `accelerate` entry point's
    imports of every other subcommand: ~1.2 s less before the first rank starts), with this interpreter."""
    env = dict(os.environ)
    if hardware.use_cpu:
        if hardware.distributed_type != "DEEPSPEED":  # DeepSpeed's ranks find the CPU themselves (trainer_core.zero)
            env["ACCELERATE_USE_CPU"] = "true"
        local = max(hardware.num_processes // max(hardware.num_machines, 1), 1)
        threads = hardware.threads_per_process or max((os.cpu_count() or 1) // local, 1)
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("DS_ACCELERATOR", "cpu")  # accelerate imports DeepSpeed, whose guess logs a warning
    # Ranks import trainer_core from the repo, wherever the flow was started from.
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # The ranks' output lands in a log, not a terminal: a progress-bar frame every 10 s, not every step.
    env.setdefault("TQDM_MININTERVAL", "10")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *program], env
