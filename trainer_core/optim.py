"""Optimizer and learning-rate schedule of a run, from TrainingArguments (transformers.Trainer's defaults).

    from trainer_core.optim import build_optimizer, build_scheduler, config_errors
    errors = config_errors(args)                       # [] or "trainer.optimizer: ..." lines, before any training
    optimizer = build_optimizer(model, args)           # AdamW, or trainer.optimizer: {_target_: torch.optim.SGD}
    scheduler = build_scheduler(optimizer, args, num_steps=plan.num_steps)
"""

from __future__ import annotations

from typing import Any

import torch

from trainer_core.args import TrainingArguments
from trainer_core.instantiate import import_object, instantiate


def config_errors(args: TrainingArguments) -> list[str]:
    """Problems of trainer.optimizer / trainer.lr_scheduler (a `_target_` that cannot be imported), named by key."""
    errors = []
    for key in ("optimizer", "lr_scheduler"):
        config = getattr(args, key)
        if not config:
            continue
        try:
            import_object(str(config.get("_target_") or ""))
        except ValueError as err:
            errors.append(f"trainer.{key}: {err}")
    return errors


def get_decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """transformers.Trainer's rule: no decay for parameters of LayerNorm modules, nor for names matching
    bias / layernorm / rmsnorm / `norm` as a name part / `_norm`."""
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return get_parameter_names(model, [torch.nn.LayerNorm], forbidden)


def build_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW (or trainer.optimizer's `_target_`) over two groups: weight decay, and none for biases and norms."""
    decay = set(get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    if args.optimizer:
        return instantiate(args.optimizer, groups, lr=args.learning_rate)
    fused = {"fused": True} if args.optim == "adamw_torch_fused" else {}
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **fused
    )


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers: the one whose param_groups' lr DeepSpeed
    steps with (an LR scheduler is attached to it)."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def build_scheduler(optimizer: Any, args: TrainingArguments, num_steps: int) -> Any:
    """transformers' get_scheduler by lr_scheduler_type (warmup from the arguments), or trainer.lr_scheduler's
    `_target_` called with the optimizer; attached to the torch optimizer inside any wrapper (Accelerate's,
    DeepSpeed's) and stepped once per optimizer step."""
    from transformers import get_scheduler

    optimizer = torch_optimizer(optimizer)
    if args.lr_scheduler:
        return instantiate(args.lr_scheduler, optimizer)
    return get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps_for(num_steps),
        num_training_steps=num_steps, scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs) or None,
    )
