"""The training engine: a torchtune-style recipe over Accelerate.

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, batch_plan=plan,
                      output_dir="runs/x", task=get_task("text_classification"), task_spec=task_spec)
    result = trainer.train()        # setup() -> resume -> loop -> best model -> final/
    metrics = trainer.evaluate()
    out = trainer.predict(test)

`__init__` validates (every problem at once, before any training), `setup` builds, `train` loops,
`save_checkpoint` / `load_checkpoint` own all state, `evaluate` / `predict` score, `cleanup` closes.
Rank logic stays behind Accelerate (accumulate, gather_for_metrics, wait_for_everyone, main_process_first).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from trainer_core import checkpoint as ckpt
from trainer_core import distributed as dist_utils
from trainer_core import zero
from trainer_core.args import TrainingArguments
from trainer_core.callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    EarlyStoppingCallback,
    MetricsFileCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    _instantiate,
)
from trainer_core.data import BatchPlan, PlanBatchSampler, build_batch_plan
from trainer_core.spec import TaskSpec

logger = logging.getLogger("trainer_core")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (a handler made once per process would otherwise keep
    writing to the stream of the moment it was made, e.g. a redirection long gone)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

FINAL = "final"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class PredictionOutput(NamedTuple):
    predictions: np.ndarray
    label_ids: np.ndarray | None
    metrics: dict[str, float]
    num_samples: int


def bf16_supported() -> bool:
    """bf16 on GPU needs Ampere or newer; on CPU torch autocasts to bf16 (slow on old CPUs, but correct)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def _import(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def get_decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """transformers.Trainer's rule: no decay for parameters of LayerNorm modules, nor for names matching
    bias / layernorm / rmsnorm / `norm` as a name part / `_norm`."""
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return get_parameter_names(model, [torch.nn.LayerNorm], forbidden)


def _neftune_hook(alpha: float) -> Callable:
    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # noise only while training: evaluation sees the clean embeddings
        if module.training:
            magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
            output = output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
        return output

    return hook


def _concat_padded(arrays: list[np.ndarray], pad: Any = -100) -> np.ndarray:
    """Concatenate batches along dim 0, right-padding dim 1 when sequence lengths differ."""
    if not arrays:
        return np.zeros((0,))
    if arrays[0].ndim < 2 or len({a.shape[1] for a in arrays}) == 1:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    padded = []
    for a in arrays:
        widths = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        padded.append(np.pad(a, widths, constant_values=pad))
    return np.concatenate(padded)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Callable | None = None,
        compute_metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        batch_plan: BatchPlan | None = None,
        output_dir: str | Path = "outputs/run",
        task: ModuleType | None = None,
        task_spec: TaskSpec | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        config_hash: str = "",
        extra_state: dict[str, Any] | None = None,
        tokenizer: Any = None,
        mlflow_run_id: str | None = None,
        config_components: dict[str, Any] | None = None,
        distributed: dict[str, Any] | None = None,
        accelerator: Accelerator | None = None,
    ):
        from trainer_core.tasks import get_task

        self.args = args
        self.task_spec = task_spec or TaskSpec()
        self.task = task or get_task(self.task_spec.family)
        self.output_dir = Path(output_dir)
        self.config_hash, self.mlflow_run_id = config_hash, mlflow_run_id
        # readable parts of config_hash, kept in each manifest: a refused resume names what differs
        model_config = getattr(model, "config", None)
        self.config_components = {
            "model": getattr(model_config, "_name_or_path", "") or getattr(model_config, "model_type", type(model).__name__),
            "task.family": self.task_spec.family,
            "num_labels": getattr(model_config, "num_labels", self.task_spec.num_labels),
            **(config_components or {}),
        }
        self.extra_state = dict(extra_state or {})
        self.tokenizer = tokenizer
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.train_dataset = self._keep_model_columns(train_dataset)
        self.eval_dataset = self._keep_model_columns(eval_dataset)

        # the validation needs the world size, and nothing else of the Accelerator; build that after
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        errors = self._validate(args, batch_plan, world_size)
        if errors:
            raise ValueError("Config is not well-formed, found the following errors:\n - " + "\n - ".join(errors))

        # built before the model by trainer_core.run: DeepSpeed ZeRO-3's zero3_init_flag partitions at construction
        self.accelerator = accelerator or self.make_accelerator(args)
        if self.accelerator.num_processes != world_size:
            raise ValueError(
                f"Launched as {world_size} processes (WORLD_SIZE) but Accelerate set up {self.accelerator.num_processes}:"
                " on CPU launch with ACCELERATE_USE_CPU=true (accelerate launch --multi_gpu --num_processes N), and "
                "build no accelerate PartialState() without cpu=True before the Trainer."
            )
        self._setup_logging()
        # the requested topology (RunSpec.distributed): FSDP that Accelerate would silently turn into DDP on CPU
        # is done here with FSDP2 (trainer_core.distributed), checkpoints then hold one shard per rank
        self.distributed = dict(distributed or {})
        self._fsdp2 = dist_utils.needs_manual_fsdp(self.distributed, self.accelerator)
        # DeepSpeed ZeRO (accelerate launch of a DEEPSPEED config): one engine for model + optimizer
        self._deepspeed = zero.active(self.accelerator)
        self.model = model
        self.data_collator = data_collator or self.task.data_collator(tokenizer)
        self.compute_metrics = compute_metrics
        if self.compute_metrics is None and self.task_spec.metrics:
            self.compute_metrics = self.task.compute_metrics(self.task_spec)
        self.loss_fn = compute_loss or (_instantiate(args.loss) if args.loss else None)

        if batch_plan is None and self.train_dataset is not None:
            batch_plan = build_batch_plan(
                len(self.train_dataset), args.per_device_train_batch_size * self.accelerator.num_processes,
                args.gradient_accumulation_steps, args.num_train_epochs, args.max_steps, args.seed,
            )
        self.plan = batch_plan

        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        self.metrics_file = MetricsFileCallback(self.output_dir, self.accelerator.is_main_process)
        default = [DefaultFlowCallback(), ProgressCallback(), self.metrics_file]
        if args.early_stopping_patience:
            default.append(EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold))
        configured = [_instantiate(c) for c in args.callbacks]
        self.callback_handler = CallbackHandler(default + configured + list(callbacks or []))
        self._is_setup = False
        self._eval_loaders: dict[Any, DataLoader] = {}
        self.control = self._fire("on_init_end")

    # --- validation ------------------------------------------------------------------------------
    def _validate(self, args: TrainingArguments, plan: BatchPlan | None, world_size: int) -> list[str]:
        errors = args.validate()
        needs_best = args.load_best_model_at_end or args.early_stopping_patience or args.metric_for_best_model
        if needs_best:
            known = ["loss", *self.task.metric_names(self.task_spec)]
            name = args.best_metric_key().removeprefix("eval_")
            if name not in known:
                errors.append(
                    f"trainer.metric_for_best_model={args.metric_for_best_model!r}: not computed by this task; "
                    f"use one of {', '.join(known)} (or add the metric to task.metrics)."
                )
        if args.mixed_precision == "bf16" and not bf16_supported():
            errors.append(
                "trainer.mixed_precision=bf16: bf16 precision was requested but not available on this hardware. "
                "Please use fp16 or no (fp32) instead."
            )
        if args.mixed_precision == "fp16" and not torch.cuda.is_available():
            errors.append("trainer.mixed_precision=fp16: needs a CUDA GPU. Please use bf16 or no (fp32) on CPU.")
        if args.eval_strategy != "no" and self.eval_dataset is None:
            errors.append(f"trainer.eval_strategy={args.eval_strategy!r} needs an eval dataset (task.eval_split).")
        if plan is not None:
            expected = args.per_device_train_batch_size * world_size
            if plan.global_micro_batch_size != expected:
                errors.append(
                    f"batch plan: global micro-batch of {plan.global_micro_batch_size} samples, but "
                    f"per_device_train_batch_size ({args.per_device_train_batch_size}) x world size ({world_size}) "
                    f"= {expected}: rebuild the plan for this hardware."
                )
            if plan.meta.get("gradient_accumulation_steps") != args.gradient_accumulation_steps:
                errors.append(
                    f"batch plan: built for gradient_accumulation_steps={plan.meta.get('gradient_accumulation_steps')}"
                    f" but trainer.gradient_accumulation_steps={args.gradient_accumulation_steps}: rebuild the plan."
                )
            if self.train_dataset is not None and plan.meta.get("num_samples") != len(self.train_dataset):
                errors.append(
                    f"batch plan: built for {plan.meta.get('num_samples')} samples but the train split has "
                    f"{len(self.train_dataset)}: rebuild the plan."
                )
        return errors

    @staticmethod
    def make_accelerator(args: TrainingArguments) -> Accelerator:
        from accelerate.utils import InitProcessGroupKwargs

        handlers = [InitProcessGroupKwargs(backend="gloo")] if zero.needs_gloo() else []
        try:
            return Accelerator(
                gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                kwargs_handlers=handlers,
            )
        except ValueError as err:
            # Accelerate's state is process-wide: a stage that scores two models with different precisions in
            # one process would be refused. Safe to reset only when no process group depends on it.
            from accelerate.state import AcceleratorState

            if "already been initialized" not in str(err) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise
            AcceleratorState._reset_state()
            return Accelerator(
                gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision
            )

    def _keep_model_columns(self, dataset: Any) -> Any:
        # the model's forward takes only its inputs; raw text and ids would break the collator
        if dataset is None or not hasattr(dataset, "column_names"):
            return dataset
        extra = [c for c in dataset.column_names if c not in self.task.MODEL_INPUT_NAMES]
        return dataset.remove_columns(extra) if extra else dataset

    def _setup_logging(self) -> None:
        acc, args = self.accelerator, self.args
        is_logging_main = acc.is_local_main_process if args.log_on_each_node else acc.is_main_process
        level_name = args.log_level if is_logging_main else args.log_level_replica
        if level_name != "passive":
            logger.setLevel(_LEVELS[level_name])
        if not any(getattr(h, "_trainer_core", False) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s [rank {acc.process_index}] %(levelname)s %(name)s: %(message)s"
            ))
            handler._trainer_core = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False

    # --- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build optimizer, scheduler, dataloader; prepare with Accelerate; resume when there is a checkpoint."""
        if self._is_setup:
            return
        args, acc = self.args, self.accelerator
        if self.plan is None:
            raise ValueError("Trainer.train needs a train_dataset (and a batch plan, or one is built).")
        if args.gradient_checkpointing:
            # recompute activations in backward: less memory, same gradients (non-reentrant works with DDP)
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self._fsdp2:  # before the optimizer: fully_shard replaces the parameters by DTensor shards
            self.model = dist_utils.shard_model(self.model, self.distributed.get("fsdp_config"), acc.device,
                                                args.mixed_precision)
        optimizer = self._setup_optimizer(self.model)
        # prepare the model and optimizer only: the train dataloader is already sharded by the plan (prepare
        # would split it again), and a prepared scheduler steps once per process per optimizer step
        if self._deepspeed:  # one DeepSpeedEngine for both, configured from these arguments
            zero.configure(acc, args)
            self.model, self.optimizer = acc.prepare(self.model, optimizer)
        else:
            if not self._fsdp2:
                self.model = acc.prepare_model(self.model)
            self.optimizer = acc.prepare_optimizer(optimizer)
        self.lr_scheduler = self._setup_scheduler(zero.torch_optimizer(self.optimizer), self.plan.num_steps)
        resume = self._resolve_resume()
        if resume is not None:
            self.load_checkpoint(resume)
        else:
            # a run killed before its first checkpoint starts over: so does its metrics file
            self.metrics_file.truncate_to(0)
        # from this run's plan and args, also after a resume: a longer plan resumes and adds the missing steps
        self.state.max_steps = self.plan.num_steps
        self.state.num_train_epochs = self.plan.num_epochs
        self.state.logging_steps = args.logging_steps
        self.state.eval_steps = args.resolved_eval_steps()
        self.state.save_steps = args.save_steps
        self.state.train_batch_size = args.per_device_train_batch_size
        self._train_loader = self._setup_train_dataloader(self.state.global_step)
        shard = self._sampler.plan.shard(self._sampler.start, acc.process_index, acc.num_processes) \
            if len(self._sampler) else []
        logger.info(
            "rank %d/%d: world_size=%d per_device_train_batch_size=%d gradient_accumulation_steps=%d steps=%d "
            "start_step=%d", acc.process_index, acc.num_processes, acc.num_processes,
            args.per_device_train_batch_size, args.gradient_accumulation_steps, self.plan.num_steps,
            self.state.global_step,
        )
        logger.info("rank %d/%d: first batch sample indices %s", acc.process_index, acc.num_processes, shard[:8])
        self._is_setup = True

    def _setup_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        args = self.args
        decay = set(get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        if args.optimizer:
            cfg = dict(args.optimizer)
            return _import(cfg.pop("_target_"))(groups, lr=args.learning_rate, **cfg)
        return torch.optim.AdamW(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )

    def _setup_scheduler(self, optimizer: torch.optim.Optimizer, num_steps: int) -> Any:
        from transformers import get_scheduler

        args = self.args
        if args.lr_scheduler:
            cfg = dict(args.lr_scheduler)
            return _import(cfg.pop("_target_"))(optimizer, **cfg)
        return get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps_for(num_steps),
            num_training_steps=num_steps, scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs) or None,
        )

    def _setup_train_dataloader(self, start_step: int) -> DataLoader:
        acc = self.accelerator
        start = int(self.plan.step_starts[start_step]) if start_step < self.plan.num_steps else len(self.plan.micro_batches)
        # O(1) resume: the sampler starts at the first micro-batch of step start_step
        self._sampler = PlanBatchSampler(self.plan, acc.process_index, acc.num_processes, start)
        # its own generator: creating an iterator must not draw from the global torch RNG (dropout's), or a
        # resumed run would be one draw off
        generator = torch.Generator().manual_seed(self.args.seed)
        return DataLoader(self.train_dataset, batch_sampler=self._sampler, collate_fn=self.data_collator,
                          num_workers=0, generator=generator)

    def _resolve_resume(self) -> Path | None:
        """The checkpoint to resume from: this run's newest complete one (a relaunch), else the one asked for.
        A warm start loads the asked-for weights here and returns None (the run starts at step 0)."""
        args, own = self.args, ckpt.find_resumable(self.output_dir)
        asked = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if own is not None and (asked is None or self.output_dir.resolve() not in asked.resolve().parents):
            if asked is not None:
                logger.info("This run already has checkpoint %s: resuming from it, not from %s", own, asked)
            return own
        if asked is None:
            return None
        if args.warm_start:
            loaded, skipped = ckpt.load_warm_start(self.accelerator.unwrap_model(self.model), asked)
            logger.info("Warm start from %s: loaded %d tensors, kept %d freshly initialised (%s); step 0, fresh "
                        "optimizer", asked, len(loaded), len(skipped), ", ".join(skipped[:8]))
            return None
        if (asked / "train_result.json").is_file() and not (asked / ckpt.MANIFEST).is_file():  # a final/ folder
            if not args.continue_training:
                raise ValueError(
                    f"Refusing to resume from {asked}: it is a finished model (final/), not a checkpoint. To train "
                    "that run further set trainer.continue_training=true (with a larger max_steps), or "
                    "trainer.warm_start=true to start a new run from its weights."
                )
            step = json.loads((asked / "train_result.json").read_text(encoding="utf-8"))["global_step"]
            last = ckpt.checkpoint_dir(asked.parent, int(step))
            if ckpt.verify(last) is not None:
                raise ValueError(
                    f"Cannot continue from {asked}: its run has no complete checkpoint of step {step} ({last}) to "
                    "take the optimizer and data position from. Point trainer.resume_from_checkpoint at one of its "
                    "checkpoints, or use trainer.warm_start=true."
                )
            asked = last
        logger.info("Resuming from the checkpoint asked for (trainer.resume_from_checkpoint): %s", asked)
        return asked

    # --- training --------------------------------------------------------------------------------
    def train(self) -> TrainOutput:
        """Train to the plan's last step (or until a callback stops), then load the best model if asked."""
        self.setup()
        args, acc, plan, state = self.args, self.accelerator, self.plan, self.state
        model, optimizer = self.model, self.optimizer
        hook = None
        if args.neftune_noise_alpha:
            embeddings = acc.unwrap_model(model).get_input_embeddings()
            hook = embeddings.register_forward_hook(_neftune_hook(args.neftune_noise_alpha))
        start_step = state.global_step
        self._last_saved_step = start_step
        self.control._new_training()
        self.control = self._fire("on_train_begin")
        batches = iter(self._train_loader)
        try:
            step = start_step
            while step < plan.num_steps:
                if step == start_step or plan.epoch_of(step) != plan.epoch_of(step - 1):
                    self.control._new_epoch()
                    self.control = self._fire("on_epoch_begin")
                self.control = self._fire("on_step_begin")
                grad_norm, local_loss = self._train_step(model, optimizer, step, batches)
                # each rank holds its share of the window's losses: their sum is the mean loss per item
                step_loss = float(acc.reduce(local_loss, reduction="sum"))
                state.train_loss_sum += step_loss
                state.window_loss_sum += step_loss
                state.global_step = step + 1
                state.epoch = plan.epoch_progress(step)
                self.control = self._fire("on_step_end", sample_indices=self._sampler.take_yielded())
                self._maybe_log_save_evaluate(grad_norm)
                cut_epoch = self.control.should_epoch_stop and not plan.is_last_step_of_epoch(step)
                if plan.is_last_step_of_epoch(step) or self.control.should_training_stop or cut_epoch:
                    self.control = self._fire("on_epoch_end")
                    self._maybe_log_save_evaluate(grad_norm)
                if self.control.should_training_stop:
                    break
                step += 1
                if cut_epoch:
                    # skip the rest of the epoch: the skipped steps count as passed, so global_step stays the
                    # plan cursor (a resume lands in the same place); the schedule does not advance for them
                    step = plan.next_epoch_start(step - 1)
                    state.global_step = step
                    batches = iter(self._setup_train_dataloader(step))
        finally:
            if hook is not None:
                hook.remove()  # eval, predict and saved weights must not see the noise

        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            logger.info("Loading best model from %s (%s=%s)", state.best_model_checkpoint,
                        args.best_metric_key(), state.best_metric)
            if self._fsdp2:
                dist_utils.load_sharded(model, None, state.best_model_checkpoint)
            elif self._deepspeed:  # the partitioned weights (ZeRO-3) come back through the engine
                zero.load(model, state.best_model_checkpoint)
            else:
                ckpt.load_weights(acc.unwrap_model(model), Path(state.best_model_checkpoint) / "model.safetensors")
        steps_done = max(state.global_step, 1)
        training_loss = state.train_loss_sum / steps_done
        metrics = {"train_loss": training_loss, "epoch": state.epoch}
        self.control = self._fire("on_train_end")
        self.train_output = TrainOutput(state.global_step, training_loss, metrics)
        return self.train_output

    def _train_step(self, model: torch.nn.Module, optimizer: Any, step: int, batches: Any) -> tuple[float, torch.Tensor]:
        """One optimizer step over the plan's micro-batches of `step`; returns the gradient norm and this
        rank's share of the step's loss."""
        acc = self.accelerator
        micro_batches = self.plan.step_range(step)
        # fetch the whole window first: the loss is normalised by the items of the window on all ranks
        window = [(mb, next(batches)) for mb in micro_batches]
        weights = [0.0 if self._sampler.is_empty(mb) else 1.0 for mb, _ in window]
        local_items = sum(float(self.task.count_items(b["labels"]).sum()) * w for (_, b), w in zip(window, weights, strict=True))
        total_items = acc.reduce(torch.tensor(local_items, device=acc.device), reduction="sum").clamp(min=1.0)
        # sync exactly at the window's last micro-batch, also for an epoch's short last window
        acc.gradient_accumulation_steps = len(window)
        acc.step = 0
        grad_norm, local_loss = 0.0, torch.zeros((), device=acc.device)
        for i, ((_, batch), weight) in enumerate(zip(window, weights, strict=True)):
            model.train()
            if self._fsdp2:  # Accelerate's no_sync does not know our FSDP2: reduce-scatter once per window
                model.set_requires_gradient_sync(i + 1 == len(window))
            with acc.accumulate(model):
                loss_sum = self._loss_sum(model, batch) * weight
                # DDP averages gradients over ranks and accelerator.backward divides by the accumulation
                # steps: undo both, so the gradient is d(sum of losses)/d(theta) / (items in the window).
                # DeepSpeed divides by its configured accumulation steps, also in an epoch's short last window.
                steps = self.model.gradient_accumulation_steps() if self._deepspeed else len(window)
                loss = loss_sum * acc.num_processes * steps / total_items
                acc.backward(loss)
                local_loss += loss_sum.detach() / total_items
                if acc.sync_gradients:
                    max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
                    grad_norm = float(dist_utils.clip_grad_norm_(model.parameters(), max_norm) if self._fsdp2
                                      else acc.clip_grad_norm_(model.parameters(), max_norm))
                    optimizer.step()
                    self._step_learning_rate = self.lr_scheduler.get_last_lr()[0]  # the rate this step used, like HF
                    if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
                        self.lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if i + 1 < len(window):
                self.control = self._fire("on_substep_end")
        return grad_norm, local_loss

    def _loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        return self._per_example_loss(logits, labels).sum()

    def _per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(logits, labels)
        return self.task.loss_per_example(logits, labels, self.args.label_smoothing_factor)

    def _maybe_log_save_evaluate(self, grad_norm: float) -> None:
        state, control = self.state, self.control
        if control.should_log and state.global_step > state.last_logged_step:
            # mean of the step losses since the last log, like transformers.Trainer
            loss = state.window_loss_sum / (state.global_step - state.last_logged_step)
            state.window_loss_sum, state.last_logged_step = 0.0, state.global_step
            self.log({"loss": loss, "grad_norm": grad_norm,
                      "learning_rate": self._step_learning_rate})
        if control.should_evaluate:
            metrics = self.evaluate()
            self._update_best(metrics)
        if control.should_save and state.global_step > self._last_saved_step:
            self.save_checkpoint()
        control._new_step()

    def _update_best(self, metrics: dict[str, float]) -> None:
        key, state = self.args.best_metric_key(), self.state
        value = metrics.get(key)
        if value is None:
            return
        better = np.greater if self.args.resolved_greater_is_better() else np.less
        if state.best_metric is None or better(value, state.best_metric):
            state.best_metric, state.best_global_step = float(value), state.global_step

    def log(self, logs: dict[str, float]) -> None:
        logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        logger.info("step %d: %s", self.state.global_step, json.dumps(logs, sort_keys=True))
        self.control = self._fire("on_log", logs=logs)

    def _fire(self, event: str, **kwargs: Any) -> TrainerControl:
        return self.callback_handler.fire(
            event, self.args, self.state, self.control, model=getattr(self, "model", None), **kwargs
        )

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss and task metrics on eval_dataset (default: the trainer's), logged with the `eval_` prefix."""
        dataset = self._keep_model_columns(eval_dataset) if eval_dataset is not None else self.eval_dataset
        output = self._prediction_loop(dataset, metric_key_prefix)
        self.log(output.metrics)
        self.control = self._fire("on_evaluate", metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset: Any, metric_key_prefix: str = "test") -> PredictionOutput:
        """Predictions (logits, or what preprocess_logits_for_metrics makes of them) for every sample once."""
        output = self._prediction_loop(self._keep_model_columns(test_dataset), metric_key_prefix)
        self.control = self._fire("on_predict", metrics=output.metrics)
        return output

    def _eval_dataloader(self, dataset: Any) -> DataLoader:
        key = getattr(dataset, "_fingerprint", None) or id(dataset)
        if key not in self._eval_loaders:
            loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                collate_fn=self.data_collator, shuffle=False)
            # through Accelerate: sharded over ranks, and gather_for_metrics drops the padding duplicates
            self._eval_loaders[key] = self.accelerator.prepare_data_loader(loader)
        return self._eval_loaders[key]

    def _prediction_loop(self, dataset: Any, prefix: str) -> PredictionOutput:
        acc = self.accelerator
        if not self._is_setup and not getattr(self, "_prepared_for_eval", False):
            # scoring without training (evaluate / predict stages): put the model on the device once
            self.model = acc.prepare_model(self.model, evaluation_mode=True)
            self._prepared_for_eval = True
        model = self.model
        was_training = model.training
        model.eval()
        preds, labels_all, losses, items = [], [], [], []
        # evaluation must not move the training RNG, else a resumed run would diverge from an uninterrupted one
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in self._eval_dataloader(dataset):
                batch = dict(batch)
                labels = batch.pop("labels", None)
                logits = model(**batch).logits
                if labels is not None:
                    losses.append(acc.gather_for_metrics(self._per_example_loss(logits, labels).detach()).cpu())
                    items.append(acc.gather_for_metrics(self.task.count_items(labels)).cpu())
                if self.preprocess_logits_for_metrics is not None:
                    logits = self.preprocess_logits_for_metrics(logits, labels)
                if labels is not None and labels.dim() > 1:  # token level: ranks may have padded differently
                    logits = acc.pad_across_processes(logits, dim=1, pad_index=-100)
                    labels = acc.pad_across_processes(labels, dim=1, pad_index=-100)
                preds.append(acc.gather_for_metrics(logits).float().cpu().numpy()
                             if logits.is_floating_point() else acc.gather_for_metrics(logits).cpu().numpy())
                if labels is not None:
                    labels_all.append(acc.gather_for_metrics(labels).cpu().numpy())
        if was_training:
            model.train()
        predictions = _concat_padded(preds)
        label_ids = _concat_padded(labels_all) if labels_all else None
        metrics: dict[str, float] = {}
        if losses:
            metrics[f"{prefix}_loss"] = float(torch.cat(losses).sum() / torch.cat(items).sum().clamp(min=1))
        if label_ids is not None and self.compute_metrics is not None:
            for name, value in self.compute_metrics(predictions, label_ids).items():
                metrics[f"{prefix}_{name}"] = value
        return PredictionOutput(predictions, label_ids, metrics, len(predictions))

    # --- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write every piece of state to checkpoints/step-N atomically (all ranks call this)."""
        acc, state = self.accelerator, self.state
        final = ckpt.checkpoint_dir(self.output_dir, state.global_step)
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            ckpt.begin(self.output_dir, state.global_step)
        acc.wait_for_everyone()
        ckpt.write_json(tmp / f"rng_state_{acc.process_index}.json", ckpt.rng_state())
        if self._fsdp2:  # each rank writes its own shard: no full state dict anywhere
            dist_utils.save_sharded(self.model, self.optimizer.optimizer, tmp)
            state_dict = None
        else:
            state_dict = acc.get_state_dict(self.model)  # collective under FSDP / DeepSpeed: every rank calls it
        if self._deepspeed:  # each rank its optimizer partition (ZeRO-3: and its parameters)
            zero.save(self.model, tmp)
        if state.best_global_step == state.global_step:
            state.best_model_checkpoint = str(final)
        state.stateful_callbacks = {type(cb).__name__: cb.state_dict() for cb in self.callback_handler.stateful()}
        state.stateful_callbacks["extra_state"] = self.extra_state
        acc.wait_for_everyone()
        if acc.is_main_process:
            if state_dict is not None:
                ckpt.save_weights(state_dict, tmp / "model.safetensors")
            if state_dict is not None and not self._deepspeed:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            (tmp / "trainer_state.json").write_text(state.to_json(), encoding="utf-8")
            self.metrics_file.sync()  # metrics.jsonl holds every step this checkpoint covers
            ckpt.commit(tmp, config_hash=self.config_hash, mlflow_run_id=self.mlflow_run_id,
                        global_step=state.global_step, config_components=self.config_components)
            logger.info("Saved checkpoint %s", final)
            ckpt.rotate(self.output_dir, self.args.save_total_limit, state.best_model_checkpoint)
        acc.wait_for_everyone()
        self._last_saved_step = state.global_step
        self.control = self._fire("on_save", checkpoint=str(final))
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, scaler, trainer state, callbacks and this rank's RNG."""
        acc, path = self.accelerator, Path(path)
        ckpt.check_loadable(path, self.config_hash, self.config_components)
        self._check_same_length(path)
        logger.info("Resuming from checkpoint %s", path)
        kind = "FSDP" if (path / dist_utils.MODEL_SHARD.format(rank=0)).exists() else \
            "DeepSpeed" if zero.is_checkpoint(path) else "DDP / single-process"
        ours = "FSDP" if self._fsdp2 else "DeepSpeed" if self._deepspeed else "DDP / single-process"
        # shards are read back by any layout: FSDP on any number of ranks, or an unsharded run (e.g. 2 GPUs -> 1)
        unshard = kind == "FSDP" and ours == "DDP / single-process"
        if kind != ours and not unshard:
            raise ValueError(f"{path} is a {kind} checkpoint but this run is {ours}: resume it with the hardware "
                             "that wrote it.")
        if self._fsdp2 or unshard:  # each rank reads the pieces of the shards it now holds (all of them: unshard)
            dist_utils.load_sharded(self.model if self._fsdp2 else acc.unwrap_model(self.model),
                                    self.optimizer.optimizer, path)
        elif self._deepspeed:
            zero.load(self.model, path)
        else:
            ckpt.load_weights(acc.unwrap_model(self.model), path / "model.safetensors")
            # onto the CPU first: Optimizer.load_state_dict moves the state to each parameter's device
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if acc.scaler is not None and (path / "scaler.pt").exists():
            acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        loaded = TrainerState.from_json((path / "trainer_state.json").read_text(encoding="utf-8"))
        loaded.is_local_process_zero = self.state.is_local_process_zero
        loaded.is_world_process_zero = self.state.is_world_process_zero
        self.state = loaded
        for callback in self.callback_handler.stateful():
            if type(callback).__name__ in loaded.stateful_callbacks:
                callback.load_state_dict(loaded.stateful_callbacks[type(callback).__name__])
        self.extra_state = loaded.stateful_callbacks.get("extra_state", self.extra_state)
        # RNG on a world size change (the plan keeps the global batch, each rank takes its share of it): rank r
        # restores rng_state_r when the checkpoint has it; a rank the saving run did not have takes rank 0's
        # python/numpy state and a torch generator seeded from (seed, step, rank), so no two ranks draw the same
        # dropout masks and the relaunch stays reproducible. Files of ranks beyond the new world are unused.
        saved_ranks = len(list(path.glob("rng_state_*.json")))
        if saved_ranks != acc.num_processes:
            logger.warning("%s was written by %d rank(s), this run has %d: RNG restored per rank where present",
                           path, saved_ranks, acc.num_processes)
        rng_path = path / f"rng_state_{acc.process_index}.json"
        if rng_path.exists():
            ckpt.set_rng_state(json.loads(rng_path.read_text(encoding="utf-8")))
        else:
            ckpt.set_rng_state(json.loads((path / "rng_state_0.json").read_text(encoding="utf-8")))
            torch.manual_seed(self.args.seed * 1_000_003 + loaded.global_step * 1_009 + acc.process_index)
        # a killed run may have logged steps after this checkpoint: they will be logged again
        self.metrics_file.truncate_to(loaded.global_step)

    def _check_same_length(self, path: Path) -> None:
        """Resuming continues the same run: a checkpoint planned for another number of steps is refused unless
        trainer.continue_training asks to train it further."""
        saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        planned, step, now = int(saved.get("max_steps") or 0), int(saved.get("global_step", 0)), self.plan.num_steps
        if self.args.continue_training:
            if step >= now:
                raise ValueError(f"trainer.continue_training: {path} is at step {step} but this run plans {now} "
                                 "steps: nothing to continue, raise trainer.max_steps (or num_train_epochs).")
            if planned != now:
                logger.info("Continuing %s (planned for %d steps) to %d steps", path, planned, now)
        elif planned and planned != now:
            raise ValueError(
                f"Refusing to resume from {path}: it belongs to a run of {planned} steps (at step {step}), this run "
                f"plans {now}. A resume continues the same run; to train it for more steps set "
                "trainer.continue_training=true, or start a new run (another output_dir)."
            )

    # --- final model -----------------------------------------------------------------------------
    def save_final(self) -> Path:
        """Write <output_dir>/final/ atomically: weights, config, tokenizer, train_result.json (all ranks call)."""
        acc = self.accelerator
        final = self.output_dir / FINAL
        # FSDP2: gathered once, onto the main process's CPU (the consolidated model of final/)
        state_dict = dist_utils.full_state_dict(self.model) if self._fsdp2 else acc.get_state_dict(self.model)
        if acc.is_main_process:
            tmp = self.output_dir / f".tmp-{FINAL}"
            if tmp.exists():
                shutil.rmtree(tmp)
            # transformers 5 loads a ZeRO-3 model with its legacy renamings attached (LayerNorm.gamma -> .weight)
            # and would "revert" them on save: DeepSpeed runs keep the names the model has
            acc.unwrap_model(self.model).save_pretrained(tmp, state_dict=state_dict,
                                                         save_original_format=not self._deepspeed)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            result = getattr(self, "train_output", None)
            (tmp / "train_result.json").write_text(json.dumps({
                "global_step": self.state.global_step,
                "training_loss": result.training_loss if result else None,
                "metrics": result.metrics if result else {},
                "best_model_checkpoint": self.state.best_model_checkpoint,
                "best_metric": self.state.best_metric,
                "config_hash": self.config_hash,
            }, indent=2, sort_keys=True), encoding="utf-8")
            for file in tmp.iterdir():
                ckpt._fsync_file(file)
            ckpt._fsync_dir(tmp)
            if final.exists():
                old = self.output_dir / f".old-{FINAL}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                shutil.rmtree(old)
            os.replace(tmp, final)
            ckpt._fsync_dir(self.output_dir)
            logger.info("Saved final model to %s", final)
        acc.wait_for_everyone()
        return final

    def cleanup(self) -> None:
        self.metrics_file.close()
        self._eval_loaders.clear()
        with contextlib.suppress(Exception):
            self.accelerator.end_training()
