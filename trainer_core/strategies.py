"""One strategy object per topology: what the training loop asks of plain/DDP, FSDP2 and DeepSpeed runs.

    strategy = make_strategy(accelerator, args, distributed=spec.distributed)
    model, optimizer = strategy.prepare(model, build_optimizer)     # wrap / shard / one DeepSpeed engine
    with strategy.accumulate(model, last=i + 1 == len(window)):   # gradients sync at the window's last only
        accelerator.backward(loss_sum * world * strategy.backward_steps(model, len(window)) / items)
    strategy.save_state(...) / strategy.load_state(...)            # the checkpoint files of this topology

`Strategy` is a plain process or DDP, both through Accelerate; `FSDP2Strategy` shards with our own `fully_shard`
(trainer_core.fsdp2: Accelerate runs its FSDP plugin as DDP on CPU); `DeepSpeedStrategy` is Accelerate's
DeepSpeed ZeRO engine (trainer_core.zero). The loop itself never asks which one it has.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainer_core import adapters, fsdp2, zero
from trainer_core import checkpoint as ckpt
from trainer_core.args import TrainingArguments

PLAIN, FSDP, DEEPSPEED = "DDP / single-process", "FSDP", "DeepSpeed"


def checkpoint_kind(folder: str | Path) -> str:
    """Which topology wrote a checkpoint folder: PLAIN, FSDP (shards) or DEEPSPEED (partitions)."""
    folder = Path(folder)
    if (folder / fsdp2.MODEL_SHARD.format(rank=0)).exists():
        return FSDP
    return DEEPSPEED if zero.is_checkpoint(folder) else PLAIN


class Strategy:
    """A plain process or DDP: Accelerate wraps the model (DDP) and the optimizer; full weights on every rank."""

    kind = PLAIN
    loads = (PLAIN, FSDP)
    """Checkpoint kinds it resumes from: FSDP shards are read whole (e.g. 2 FSDP ranks -> 1 plain process)."""

    def __init__(self, accelerator: Any, args: TrainingArguments, distributed: dict[str, Any] | None = None):
        self.accelerator, self.args = accelerator, args
        self.distributed = dict(distributed or {})

    # --- setup -----------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
                ) -> tuple[torch.nn.Module, Any]:
        """Model and optimizer made ready for training (the optimizer is built by `build_optimizer(model)`)."""
        optimizer = build_optimizer(model)
        return self.accelerator.prepare_model(model), self.accelerator.prepare_optimizer(optimizer)

    # --- one optimizer step ----------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """One micro-batch of an accumulation window: gradients sync, and the optimizer steps, only at its last.

        What `accelerator.accumulate(model)` does, except for where a window ends: accumulate counts micro-batches
        itself, and its count has no public reset, while the plan's windows end where the plan says (an epoch's
        last window may be short). So the sync flag is set here and `no_sync` entered for the others."""
        acc = self.accelerator
        acc.sync_gradients = last  # read by accelerator.backward (DeepSpeed), clip_grad_norm_, optimizer.step
        with contextlib.nullcontext() if last else acc.no_sync(model):
            yield

    def backward_steps(self, model: torch.nn.Module, window_steps: int) -> int:
        """The divisor the backward applies to the loss: accelerator.backward divides by the window's length."""
        return window_steps

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to max_norm; returns the norm before clipping (over all ranks)."""
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    # --- checkpoints -----------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, optimizer: Any, folder: Path) -> dict[str, torch.Tensor] | None:
        """Every rank: write this rank's own files into `folder`; returns the full model state dict that the main
        process then writes (`write_state`), None where the weights stay sharded."""
        state_dict = self.accelerator.get_state_dict(model)  # a collective under DDP too: every rank calls it
        # LoRA: only what trains (adapters + modules_to_save); the frozen base comes back from its own weights
        return adapters.trainable_only(self.accelerator.unwrap_model(model), state_dict)

    def write_state(self, state_dict: dict[str, torch.Tensor] | None, optimizer: Any, folder: Path) -> None:
        """Main process: model.safetensors and optimizer.pt."""
        ckpt.save_weights(state_dict, folder / "model.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def check_kind(self, folder: Path) -> str:
        """The kind of checkpoint `folder` is; refused when this topology cannot resume from it."""
        kind = checkpoint_kind(folder)
        if kind not in self.loads:
            raise ValueError(f"{folder} is a {kind} checkpoint but this run is {self.kind}: resume it with the "
                             "hardware that wrote it.")
        return kind

    def load_state(self, model: torch.nn.Module, optimizer: Any, folder: Path) -> None:
        """Model weights and optimizer state from a checkpoint folder (after `check_kind`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if checkpoint_kind(folder) == FSDP:  # every rank reads all the pieces of every shard
            fsdp2.load_sharded(unwrapped, optimizer.optimizer, folder)
            return
        _load_weights(unwrapped, folder / "model.safetensors")
        # onto the CPU first: Optimizer.load_state_dict moves the state to each parameter's device
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))

    def load_weights(self, model: torch.nn.Module, folder: str | Path) -> None:
        """Only the model weights of a checkpoint (the best model at the end of training)."""
        _load_weights(self.accelerator.unwrap_model(model), Path(folder) / "model.safetensors")

    # --- final model -----------------------------------------------------------------------------
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every rank calls it (a collective); the main process gets the full weights for final/."""
        return self.accelerator.get_state_dict(model)

    def save_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for final/'s save_pretrained (adapters.save_final for a LoRA model)."""
        return self._final_kwargs({"save_original_format": True})

    # where the live parameters are shards (FSDP2, ZeRO-3), a LoRA model's final/ is written from the state dict
    # `full_state_dict` gathered (adapters.save_final rebuilds a plain copy from it), not from the live model
    _gathered: dict[str, torch.Tensor] | None = None

    def _keep_for_adapter_final(self, model: torch.nn.Module, state: dict[str, torch.Tensor]
                                ) -> dict[str, torch.Tensor]:
        self._gathered = state if adapters.is_adapted(self.accelerator.unwrap_model(model)) else None
        return state

    def _final_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs if self._gathered is None else {**kwargs, "state_dict": self._gathered}


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    # an adapted model's checkpoint holds its trained tensors only (see Strategy.save_state)
    (adapters.load_trainable if adapters.is_adapted(model) else ckpt.load_weights)(model, path)


class FSDP2Strategy(Strategy):
    """FSDP2 (`fully_shard`, trainer_core.fsdp2): each rank holds ~1/world of every parameter and optimizer state,
    checkpoints hold one shard per rank, final/ is gathered once onto the main process's CPU."""

    kind = FSDP
    loads = (FSDP,)

    def prepare(self, model, build_optimizer):
        # before the optimizer: fully_shard replaces the parameters by DTensor shards
        model = fsdp2.shard_model(model, self.distributed.get("fsdp_config"), self.accelerator.device,
                                  self.args.mixed_precision)
        return model, self.accelerator.prepare_optimizer(build_optimizer(model))

    @contextlib.contextmanager
    def accumulate(self, model, last):
        # Accelerate's no_sync does not know our FSDP2: reduce-scatter once per window
        model.set_requires_gradient_sync(last)
        with super().accumulate(model, last):
            yield

    def clip_grad_norm_(self, model, max_norm):
        return fsdp2.clip_grad_norm_(model.parameters(), max_norm)

    def save_state(self, model, optimizer, folder):
        # each rank writes its own shard: no full state dict anywhere
        fsdp2.save_sharded(model, optimizer.optimizer, folder)
        return None

    def write_state(self, state_dict, optimizer, folder):
        pass  # the shards are all there is

    def load_state(self, model, optimizer, folder):
        # each rank reads the pieces of the shards it now holds (any number of ranks)
        fsdp2.load_sharded(model, optimizer.optimizer, folder)

    def load_weights(self, model, folder):
        fsdp2.load_sharded(model, None, folder)

    def full_state_dict(self, model):
        # gathered once, onto the main process's CPU
        return self._keep_for_adapter_final(model, fsdp2.full_state_dict(model))


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO through Accelerate (trainer_core.zero): one engine for model and optimizer, configured from
    the arguments; each rank saves its optimizer partition (ZeRO-3: and its parameters)."""

    kind = DEEPSPEED
    loads = (DEEPSPEED,)

    def prepare(self, model, build_optimizer):
        optimizer = build_optimizer(model)
        zero.configure(self.accelerator, self.args)
        return self.accelerator.prepare(model, optimizer)

    def backward_steps(self, model, window_steps):
        # DeepSpeed divides by its configured accumulation steps, also in an epoch's short last window
        return model.gradient_accumulation_steps()

    def save_state(self, model, optimizer, folder):
        state_dict = self.accelerator.get_state_dict(model)  # collective: every rank calls it
        unwrapped = self.accelerator.unwrap_model(model)
        # LoRA: DeepSpeed's module states and model.safetensors without the frozen base (it has no optimizer state)
        zero.save(model, folder, exclude_frozen=adapters.is_adapted(unwrapped))
        return adapters.trainable_only(unwrapped, state_dict) if state_dict else state_dict

    def write_state(self, state_dict, optimizer, folder):
        ckpt.save_weights(state_dict, folder / "model.safetensors")  # the optimizer is in DeepSpeed's files

    def load_state(self, model, optimizer, folder):
        zero.load(model, folder, frozen_excluded=adapters.is_adapted(self.accelerator.unwrap_model(model)))

    def load_weights(self, model, folder):
        # the partitioned weights (ZeRO-3) come back through the engine
        zero.load(model, folder, frozen_excluded=adapters.is_adapted(self.accelerator.unwrap_model(model)))

    def save_pretrained_kwargs(self):
        # transformers 5 loads a ZeRO-3 model with its legacy renamings attached (LayerNorm.gamma -> .weight)
        # and would "revert" them on save: DeepSpeed runs keep the names the model has
        return self._final_kwargs({"save_original_format": False})

    def full_state_dict(self, model):
        return self._keep_for_adapter_final(model, super().full_state_dict(model))


def make_strategy(accelerator: Any, args: TrainingArguments, distributed: dict[str, Any] | None = None) -> Strategy:
    """The strategy of this launch: DeepSpeed when `accelerate launch` set it up, FSDP2 when the run spec asks for
    FSDP over several processes (Accelerate would silently run it as DDP on CPU), else plain / DDP."""
    _deepspeed_engines_need_deepspeed()
    if zero.active(accelerator):
        return DeepSpeedStrategy(accelerator, args, distributed)
    if fsdp2.needs_manual_fsdp(distributed, accelerator):
        return FSDP2Strategy(accelerator, args, distributed)
    return Strategy(accelerator, args, distributed)


def _deepspeed_engines_need_deepspeed() -> None:
    """Accelerate's unwrap_model (inside get_state_dict, save_model, ... too) imports deepspeed wherever it is
    installed, only to ask whether the model is a DeepSpeedEngine: ~1 s per rank of a run that has none. A model can
    be an engine only once deepspeed is imported (a DeepSpeed run imports it to build one), so the question is put
    to sys.modules first. Idempotent; the answer for a DeepSpeed run is unchanged."""
    from accelerate.utils import other

    installed = other.is_deepspeed_available
    if getattr(installed, "asks_sys_modules", False):
        return

    def deepspeed_in_use() -> bool:
        return "deepspeed" in sys.modules and installed()

    deepspeed_in_use.asks_sys_modules = True
    other.is_deepspeed_available = deepspeed_in_use
