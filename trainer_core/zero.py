"""DeepSpeed ZeRO (stages 2 and 3) through Accelerate, on GPUs (nccl) and on CPU processes (gloo).

The launcher writes `distributed_type: DEEPSPEED` into the accelerate YAML; `accelerate launch` then sets
ACCELERATE_USE_DEEPSPEED and the plugin's ZeRO stage for every rank. Two things differ from the other topologies:

- Model and optimizer are prepared together (`accelerator.prepare(model, optimizer)` builds one DeepSpeedEngine).
  The batch geometry, accumulation and clipping come from the trainer's arguments (`configure`), not from the
  hardware group, so `hardware=deepspeed_zero2` trains the run `hardware=cpu` trains.
- On CPU there is no CUDA backend to find: the ranks join a gloo group (`process_group_kwargs`), DeepSpeed's CPU
  accelerator does the rest (Accelerate's own `use_cpu` would switch DeepSpeed off).

Checkpoints are DeepSpeed's own files (`engine.save_checkpoint`: each rank writes its partition of the optimizer
state, and under ZeRO-3 of the parameters) written flat into the step folder, beside the trainer's
model.safetensors. DeepSpeed itself would unpickle them in full; here its checkpoint engine is swapped for one
that loads with `weights_only=True`, allowing only DeepSpeed's plain-data classes (loss scaler, stage, fragment).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

TAG = ""  # DeepSpeed's files go straight into the step folder (DeepSpeed would add a global_stepN/ level)
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def requested() -> bool:
    """`accelerate launch` of a DEEPSPEED config sets this for every rank."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def needs_gloo() -> bool:
    """DeepSpeed without CUDA: Accelerate finds no backend for plain CPU ranks unless one is named, and its
    `cpu=True` would turn DeepSpeed off, so the ranks ask for gloo."""
    return requested() and not torch.cuda.is_available()


def process_group_kwargs(use_cpu: bool) -> dict[str, Any]:
    """Keyword arguments for the first PartialState of a rank (see `needs_gloo`)."""
    return {"backend": "gloo"} if needs_gloo() else {"cpu": use_cpu}


def active(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure(accelerator: Any, args: Any) -> None:
    """Fill the DeepSpeed config from the trainer's arguments, before `prepare` builds the engine."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    config["gradient_clipping"] = args.max_grad_norm if args.max_grad_norm > 0 else 0.0
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # model.safetensors of every checkpoint and of final/ needs the full weights once per save
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints stay off
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps


def local_parameter_counts(model: torch.nn.Module) -> tuple[int, int] | None:
    """(numel held by this rank, numel of the model) under ZeRO-3, None for unpartitioned models."""
    params = list(model.parameters())
    if not params or not hasattr(params[0], "ds_numel"):
        return None
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) of a DeepSpeed checkpoint file: tensors, containers and DeepSpeed's
    loss-scaler / stage enum / fragment address; any other class in the file is refused."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


_SAFE_ENGINE: type | None = None


def _use_safe_loader(engine: Any) -> None:
    """Swap DeepSpeed's default checkpoint engine for one whose `load` is `safe_load` (defined once, lazily:
    DeepSpeed is an optional extra)."""
    global _SAFE_ENGINE
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if _SAFE_ENGINE is None:
        class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
            def load(self, path: str, map_location: Any = None) -> Any:
                return safe_load(path, map_location)

        _SAFE_ENGINE = WeightsOnlyCheckpointEngine
    current = type(engine.checkpoint_engine)
    if current is _SAFE_ENGINE:
        return
    if current is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {current.__name__} is not supported here: leave the "
                         "DeepSpeed config's checkpoint engine at its default.")
    engine.checkpoint_engine = _SAFE_ENGINE()


def save(engine: Any, directory: str | Path, exclude_frozen: bool = False) -> None:
    """Collective: every rank writes its DeepSpeed files into `directory` (model states on rank 0, one optimizer
    partition per rank). DeepSpeed's recovery scripts are not kept: model.safetensors holds the weights.
    exclude_frozen (LoRA): the frozen base is left out of the module states; it comes back from its own weights."""
    _use_safe_loader(engine)
    engine.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    if engine.global_rank == 0:
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            (Path(directory) / script).unlink(missing_ok=True)


def saved_world_size(directory: str | Path) -> int:
    return sum(1 for p in Path(directory).iterdir() if OPTIM_FILE.match(p.name))


def is_checkpoint(directory: str | Path) -> bool:
    return saved_world_size(directory) > 0


def load(engine: Any, directory: str | Path, frozen_excluded: bool = False) -> None:
    """Collective: restore module weights and this rank's optimizer partition from `directory`.
    frozen_excluded: the checkpoint holds the trained tensors only (see `save`); the module keeps its frozen ones."""
    saved, world = saved_world_size(directory), engine.world_size
    if saved != world:
        raise ValueError(
            f"{directory} is a DeepSpeed ZeRO checkpoint of {saved} ranks (the optimizer state is partitioned "
            f"per rank), this run has {world}: resume it with {saved} processes (hardware.num_processes={saved})."
        )
    _use_safe_loader(engine)
    path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=not frozen_excluded,
                                     load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {directory}")
