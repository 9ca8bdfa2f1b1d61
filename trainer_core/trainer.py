"""The training engine: a torchtune-style recipe over Accelerate.

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, batch_plan=plan,
                      output_dir="runs/x", task=get_task("text_classification")(task_spec))
    result = trainer.train()        # setup() -> resume -> loop -> best model
    trainer.save_final()            # final/
    metrics = trainer.evaluate()
    out = trainer.predict(test)

`__init__` validates (every problem at once, before any training), `setup` builds, `train` loops,
`save_checkpoint` / `load_checkpoint` own all state, `evaluate` / `predict` score, `cleanup` closes.
The topology (plain / DDP, FSDP2, DeepSpeed) is the strategy's business (trainer_core.strategies), the files
the checkpoint manager's (trainer_core.checkpointing); rank logic stays behind Accelerate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from trainer_core import evaluation, resume, zero
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
)
from trainer_core.checkpointing import CheckpointManager
from trainer_core.data import BatchPlan, PlanBatchSampler, build_batch_plan
from trainer_core.evaluation import PredictionOutput
from trainer_core.instantiate import instantiate
from trainer_core.metrics import is_better
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.optim import config_errors as optimizer_config_errors
from trainer_core.precision import AUTO, PRECISIONS, bf16_weights, full_eval_problem, precision_problem, resolve
from trainer_core.spec import DIVERGED, PREEMPTED, TaskSpec
from trainer_core.strategies import make_strategy
from trainer_core.tasks._common import bucketed
from trainer_core.tasks.base import TaskFamily
from trainer_core.transfer import batch_to_device, to_device

logger = logging.getLogger("trainer_core")
GENERATION_KEYS = ("predict_with_generate", "generation_max_length", "generation_num_beams", "generation_config")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf (trainer.stop_on_nonfinite)."""


class TrainingPreempted(RuntimeError):
    """SIGTERM arrived (trainer.save_on_sigterm): the ranks stopped together at a step boundary, after its
    checkpoint."""


class _PendingStep(NamedTuple):
    """A step's numbers not yet read off the device: [loss, SIGTERM flag] summed over the ranks, the gradient
    norm, and the host-side facts of that step."""
    global_step: int
    reduced: torch.Tensor
    grad_norm: Any
    learning_rate: float
    skipped: bool


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a float tensor beside `like` (DeepSpeed may report a Python number, or None before its
    first step)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(like.device, torch.float32)
    return torch.tensor(float("nan") if value is None else float(value), device=like.device)


def _pads_itself(task: TaskFamily) -> bool:
    """Whether the family's collator rounds lengths up itself (its options have pad_to_multiple_of: seq2seq)."""
    options = getattr(task, "options", None)
    return dataclasses.is_dataclass(options) and hasattr(options, "pad_to_multiple_of")


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (a handler made once per process would otherwise keep
    writing to the stream of the moment it was made, e.g. a redirection long gone)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _neftune_hook(alpha: float) -> Callable:
    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # noise only while training: evaluation sees the clean embeddings
        if module.training:
            magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
            output = output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
        return output

    return hook


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
        task: TaskFamily | type[TaskFamily] | None = None,
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
        args = self._resolve_precision(args)
        self.args = args
        self.task_spec = task_spec or (task.spec if isinstance(task, TaskFamily) else TaskSpec())
        self.task = self._make_task(task, args, compute_loss)
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
        self._eval_split = eval_dataset  # every column the family kept: what its metrics may read

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
        # the requested topology (RunSpec.distributed, the accelerate launch): plain / DDP, FSDP2 or DeepSpeed
        self.distributed = dict(distributed or {})
        self.strategy = make_strategy(self.accelerator, args, self.distributed)
        self.model = model
        self.data_collator = self._bucketed(data_collator or self.task.collator(tokenizer, model), tokenizer)
        self.compute_metrics = compute_metrics
        """Hugging Face style `compute_metrics(predictions, label_ids)`; None: the task family's metrics."""

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
        self.checkpoints = CheckpointManager(
            self.output_dir, self.accelerator, self.strategy, config_hash=config_hash, mlflow_run_id=mlflow_run_id,
            config_components=self.config_components, save_total_limit=args.save_total_limit,
            metrics_file=self.metrics_file,
        )
        default = [DefaultFlowCallback(), ProgressCallback(), self.metrics_file]
        if args.early_stopping_patience:
            default.append(EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold))
        configured = [instantiate(c) for c in args.callbacks]
        self.callback_handler = CallbackHandler(default + configured + list(callbacks or []))
        self._is_setup = False
        self._prepared_for_eval = False
        self._pending: list[_PendingStep] = []  # steps whose numbers are still on the device (_settle)
        self._grad_norm = float("nan")
        self._eval_loaders: dict[Any, DataLoader] = {}
        self.control = self._fire("on_init_end")

    # --- validation ------------------------------------------------------------------------------
    def _validate(self, args: TrainingArguments, plan: BatchPlan | None, world_size: int) -> list[str]:
        errors = args.validate() + optimizer_config_errors(args) + self.task.training_errors(args)
        needs_best = args.load_best_model_at_end or args.early_stopping_patience or args.metric_for_best_model
        if needs_best:
            known = ["loss", *self.task.metric_names()]
            name = args.best_metric_key().removeprefix("eval_")
            if name not in known:
                errors.append(
                    f"trainer.metric_for_best_model={args.metric_for_best_model!r}: not computed by this task; "
                    f"use one of {', '.join(known)} (or add the metric to task.metrics)."
                )
        if args.mixed_precision in PRECISIONS and (problem := precision_problem(args.mixed_precision)):
            errors.append(problem)
        if problem := full_eval_problem(args.bf16_full_eval):
            errors.append(problem)
        if args.pad_to_multiple_of and not self.task.has_length:
            errors.append(f"trainer.pad_to_multiple_of={args.pad_to_multiple_of}: task.family={self.task_spec.family} "
                          "has no sequence length to pad; drop the key.")
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
    def _resolve_precision(args: TrainingArguments) -> TrainingArguments:
        """mixed_precision=auto made concrete for this machine (bf16 where native, else no), logged once."""
        if args.mixed_precision != AUTO:
            return args
        import torch

        on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
        value, why = resolve(AUTO, use_cpu=on_cpu)
        logger.info("trainer.mixed_precision=auto resolved to %s (%s)", value, why)
        return dataclasses.replace(args, mixed_precision=value)

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
            AcceleratorState._reset_state()  # private: Accelerate has no public way to drop its process-wide state
            return Accelerator(
                gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision
            )

    def _make_task(self, task: Any, args: TrainingArguments, compute_loss: Callable | None) -> TaskFamily:
        """The task family (an instance, a class, or the spec's family) with the loss options of `args`."""
        if task is None or isinstance(task, type):
            from trainer_core.tasks import get_task

            task = (task or get_task(self.task_spec.family))(self.task_spec)
        task.label_smoothing = args.label_smoothing_factor
        task.loss_hook = compute_loss or (instantiate(args.loss) if args.loss else None)
        # the Seq2SeqTrainingArguments names reach a generating family through its options
        generation = {key: getattr(args, key) for key in GENERATION_KEYS if getattr(args, key) is not None}
        if task.generates and generation:
            fields = {f.name for f in dataclasses.fields(task.options)}
            task.options = dataclasses.replace(task.options, **{k: v for k, v in generation.items() if k in fields})
        if args.sequence_multiple() and _pads_itself(task) and task.options.pad_to_multiple_of is None:
            # the family pads itself (seq2seq): to this multiple
            task.options = dataclasses.replace(task.options, pad_to_multiple_of=args.sequence_multiple())
        return task

    def _bucketed(self, collate: Callable, tokenizer: Any) -> Callable:
        """The collator, rounding sequence lengths up to trainer.pad_to_multiple_of (16 with torch_compile); a
        family that pads itself (seq2seq: sources and labels) got the multiple as its option in _make_task."""
        multiple = self.args.sequence_multiple()
        if not multiple or not self.task.has_length or _pads_itself(self.task):
            return collate
        return bucketed(collate, multiple, getattr(tokenizer, "pad_token_id", None) or 0)

    def _keep_model_columns(self, dataset: Any) -> Any:
        # the collator takes only the family's model inputs and targets; raw text and ids would break it
        if dataset is None or not hasattr(dataset, "column_names"):
            return dataset
        extra = [c for c in dataset.column_names if c not in self.task.dataset_columns()]
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
        """Build optimizer, scheduler, dataloader; prepare for the topology; resume when there is a checkpoint."""
        if self._is_setup:
            return
        args, acc = self.args, self.accelerator
        if self.plan is None:
            raise ValueError("Trainer.train needs a train_dataset (and a batch plan, or one is built).")
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        if args.torch_compile:
            # in place (nn.Module.compile): the state dict keeps its names, so checkpoints do not change
            self.model.compile(backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode)
        # the train dataloader is not prepared: the plan already shards it (prepare would split it again), and a
        # prepared scheduler would step once per process per optimizer step
        self.model, self.optimizer = self.strategy.prepare(self.model, functools.partial(build_optimizer, args=args))
        self.lr_scheduler = build_scheduler(self.optimizer, args, self.plan.num_steps)
        checkpoint = resume.resume_checkpoint(self.output_dir, args, acc.unwrap_model(self.model))
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
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

    def _enable_gradient_checkpointing(self) -> None:
        # recompute activations in backward: less memory, same gradients (non-reentrant works with DDP)
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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
        self._sigterm, self._sigterm_sent, self._sigterm_seen = False, False, False
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if args.save_on_sigterm else None
        try:
            step = start_step
            while step < plan.num_steps:
                if step == start_step or plan.epoch_of(step) != plan.epoch_of(step - 1):
                    self.control._new_epoch()
                    self.control = self._fire("on_epoch_begin")
                self.control = self._fire("on_step_begin")
                grad_norm, local_loss = self.training_step(model, optimizer, step, batches)
                # each rank holds its share of the window's losses: their sum is the mean loss per item. A SIGTERM
                # flag rides along in the same collective: every rank learns whether any got one. The result stays
                # on the device until the next logging / eval / save step reads it (_settle): no sync in between
                self._sigterm_sent = self._sigterm  # what this rank put in the collective, as of this step
                flag = local_loss.new_full((), float(self._sigterm_sent))  # filled on the device: no copy
                reduced = acc.reduce(torch.stack([local_loss, flag]), reduction="sum")
                self._pending.append(_PendingStep(step + 1, reduced, grad_norm, self._step_learning_rate,
                                                  self._step_skipped()))
                state.global_step = step + 1
                state.epoch = plan.epoch_progress(step)
                self.control = self._fire("on_step_end", sample_indices=self._sampler.take_yielded())
                self._maybe_log_save_evaluate()
                cut_epoch = self.control.should_epoch_stop and not plan.is_last_step_of_epoch(step)
                if plan.is_last_step_of_epoch(step) or self.control.should_training_stop or cut_epoch:
                    self.control = self._fire("on_epoch_end")
                    self._maybe_log_save_evaluate()
                if self._sigterm_agreed():
                    self._stop_on_sigterm()
                if self.control.should_training_stop:
                    break
                step += 1
                if cut_epoch:
                    # skip the rest of the epoch: the skipped steps count as passed, so global_step stays the
                    # plan cursor (a resume lands in the same place); the schedule does not advance for them
                    next_start = plan.next_epoch_start(step - 1)
                    skipped, step = next_start - step, next_start
                    state.global_step = step
                    # neither the logged window mean nor training_loss counts them (transformers' global_step
                    # never holds untrained steps)
                    state.skipped_steps += skipped
                    state.last_logged_step += skipped
                    batches = iter(self._setup_train_dataloader(step))
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if hook is not None:
                hook.remove()  # eval, predict and saved weights must not see the noise

        self._settle()  # the steps since the last logging step: their losses count in training_loss
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            logger.info("Loading best model from %s (%s=%s)", state.best_model_checkpoint,
                        args.best_metric_key(), state.best_metric)
            self.checkpoints.load_best(model, state.best_model_checkpoint)
        steps_done = max(state.global_step - state.skipped_steps, 1)
        training_loss = state.train_loss_sum / steps_done
        metrics = {"train_loss": training_loss, "epoch": state.epoch}
        self.control = self._fire("on_train_end")
        self.train_output = TrainOutput(state.global_step, training_loss, metrics)
        return self.train_output

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True  # acted on at a step boundary, by every rank at the same step (_sigterm_agreed)

    def _sigterm_agreed(self) -> bool:
        """Whether the ranks stop here: one process stops at the end of the step SIGTERM came in during; several
        stop at the next logging / eval / save step, where the flag that rode in the loss all-reduce is read
        (_settle)."""
        if self.accelerator.num_processes == 1:
            return self._sigterm_sent
        return self._sigterm_seen

    def _step_skipped(self) -> bool:
        # fp16's grad scaler skips a step on overflow; asking is a host sync, so only fp16 asks
        return self.args.mixed_precision == "fp16" and self.accelerator.optimizer_step_was_skipped

    def _settle(self) -> None:
        """Read the steps' reduced losses, SIGTERM flags and gradient norms off the device in one transfer (note:
        this is the CPU-GPU sync point of the loop), then account for them step by step in order, as if read at
        each step: the divergence check names the first bad step, the loss sums are the same floats."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = torch.stack([torch.cat([p.reduced.float(), _as_tensor(p.grad_norm, p.reduced).reshape(1)])
                            for p in pending]).tolist()
        state = self.state
        for p, (step_loss, stop, grad_norm) in zip(pending, rows, strict=True):
            if self.args.stop_on_nonfinite and not self._finite(step_loss, grad_norm, p.skipped):
                state.global_step = p.global_step - 1  # the state holds the last healthy step
                self._diverged(p.global_step, step_loss, grad_norm, p.learning_rate)
            state.train_loss_sum += step_loss
            state.window_loss_sum += step_loss
            self._sigterm_seen = self._sigterm_seen or bool(stop)
            self._grad_norm = grad_norm

    def _stop_on_sigterm(self) -> None:
        """Checkpoint the step just finished (unless it is already saved) and raise TrainingPreempted."""
        state = self.state
        if state.global_step > self._last_saved_step:
            self.save_checkpoint()
        folder = self.checkpoints.folder(state.global_step)
        raise TrainingPreempted(f"{PREEMPTED} stopped at step {state.global_step} of {self.plan.num_steps}, "
                                f"checkpoint {folder}; the next run resumes from it")

    def _finite(self, step_loss: float, grad_norm: float, skipped: bool) -> bool:
        """Whether a step's loss and gradient norm are finite (fp16: a step the grad scaler skipped counts as
        finite: the scaler lowers its scale and goes on).

        Every rank decides the same without a further collective: the step loss was reduced over the ranks, and
        the gradient norm is that of the synchronised gradients (over all shards), so all ranks raise at the same
        step and none is left waiting in a collective. Plain float checks: the numbers are not touched.
        """
        return skipped or (math.isfinite(step_loss) and math.isfinite(grad_norm))

    def _diverged(self, global_step: int, step_loss: float, grad_norm: float, learning_rate: float) -> None:
        """Raise TrainingDiverged (trainer.stop_on_nonfinite) naming the step, the numbers and the fixes."""
        args = self.args
        precision = {"no": "fp32"}.get(args.mixed_precision, args.mixed_precision)
        clip = f"trainer.max_grad_norm={args.max_grad_norm:g}" + (" (no clipping)" if args.max_grad_norm <= 0 else "")
        hints = [f"lower trainer.learning_rate (now {args.learning_rate:g})",
                 "set trainer.max_grad_norm=1.0" if args.max_grad_norm <= 0 else "lower trainer.max_grad_norm"]
        if args.mixed_precision != "no":
            hints.append("train in fp32 (trainer.mixed_precision=no)")
        raise TrainingDiverged(
            f"{DIVERGED} loss={step_loss} grad_norm={grad_norm} at step {global_step} (learning rate "
            f"{learning_rate:.3g}, {precision}, {clip}); try: "
            + "; ".join(hints) + " (trainer.stop_on_nonfinite=false trains on regardless)"
        )

    def training_step(self, model: torch.nn.Module, optimizer: Any, step: int, batches: Any
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the plan's micro-batches of `step`; returns the gradient norm and this
        rank's share of the step's loss, both still on the device."""
        acc = self.accelerator
        # fetch the whole window first: the loss is normalised by the items of the window on all ranks
        window = [(mb, next(batches)) for mb in self.plan.step_range(step)]
        weights = [0.0 if self._sampler.is_empty(mb) else 1.0 for mb, _ in window]
        # counted on the host batches, summed as tensors: whole numbers, so exactly the floats they were
        local_items = sum((self._count_items(b).sum() * int(w) for (_, b), w in zip(window, weights, strict=True)),
                          start=torch.zeros((), dtype=torch.int64))
        total_items = acc.reduce(to_device(local_items.float(), acc.device), reduction="sum").clamp(min=1.0)
        # accelerator.backward divides the loss by this: the window's own length, as an epoch's last window may be
        # short (DeepSpeed divides by its configured steps instead, see strategy.backward_steps)
        acc.gradient_accumulation_steps = len(window)
        steps = self.strategy.backward_steps(model, len(window))
        grad_norm, local_loss = torch.zeros(()), torch.zeros((), device=acc.device)
        for i, ((_, batch), weight) in enumerate(zip(window, weights, strict=True)):
            last = i + 1 == len(window)
            model.train()
            with self.strategy.accumulate(model, last):  # gradients sync exactly at the window's last micro-batch
                loss_sum = self._sum_losses(model, batch) * weight
                # DDP averages gradients over ranks and the backward divides by `steps`: undo both, so the
                # gradient is d(sum of losses)/d(theta) / (items in the window)
                loss = loss_sum * acc.num_processes * steps / total_items
                acc.backward(loss)
                local_loss += loss_sum.detach() / total_items
                if last:
                    grad_norm = self._optimizer_step(model, optimizer)
            if not last:
                self.control = self._fire("on_substep_end")
        return grad_norm, local_loss

    def _optimizer_step(self, model: torch.nn.Module, optimizer: Any) -> torch.Tensor:
        """Clip, step the optimizer and the schedule, drop the gradients; returns the norm before clipping."""
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = self.strategy.clip_grad_norm_(model, max_norm)  # a tensor: read at the next logging step
        optimizer.step()
        self._step_learning_rate = self.lr_scheduler.get_last_lr()[0]  # the rate this step used, like HF
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # --- the task family's part of a step (trainer_core/tasks/base.py) ----------------------------
    def _sum_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, targets = self.task.split_batch(batch_to_device(batch, self.accelerator.device))
        return self.task.loss(model(**inputs), targets).sum()

    def _count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.count_items(self.task.split_batch(batch)[1])

    # --- log / evaluate / save -------------------------------------------------------------------
    def _maybe_log_save_evaluate(self) -> None:
        state, control = self.state, self.control
        if control.should_log or control.should_evaluate or control.should_save:
            self._settle()
        if control.should_log and state.global_step > state.last_logged_step:
            # mean of the step losses since the last log, like transformers.Trainer
            loss = state.window_loss_sum / (state.global_step - state.last_logged_step)
            state.window_loss_sum, state.last_logged_step = 0.0, state.global_step
            self.log({"loss": loss, "grad_norm": self._grad_norm, "learning_rate": self._step_learning_rate})
        if control.should_evaluate:
            metrics = self.evaluate()
            self._update_best(metrics)
        if control.should_save and state.global_step > self._last_saved_step:
            self.save_checkpoint()
        control._new_step()

    def _update_best(self, metrics: dict[str, float]) -> None:
        value = metrics.get(self.args.best_metric_key())
        if value is not None and is_better(value, self.state.best_metric, self.args.resolved_greater_is_better()):
            self.state.best_metric, self.state.best_global_step = float(value), self.state.global_step

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
        output = self._prediction_loop(self._eval_split if eval_dataset is None else eval_dataset, metric_key_prefix)
        self.log(output.metrics)
        self.control = self._fire("on_evaluate", metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset: Any, metric_key_prefix: str = "test") -> PredictionOutput:
        """Every sample once: `predictions` (the family's prediction_key output, e.g. logits, or what
        preprocess_logits_for_metrics makes of them) and `outputs` (all of the family's eval outputs)."""
        output = self._prediction_loop(test_dataset, metric_key_prefix)
        self.control = self._fire("on_predict", metrics=output.metrics)
        return output

    def _eval_dataloader(self, dataset: Any) -> DataLoader:
        dataset = self._keep_model_columns(dataset)
        key = getattr(dataset, "_fingerprint", None) or id(dataset)
        if key not in self._eval_loaders:
            self._eval_loaders[key] = evaluation.eval_dataloader(
                dataset, self.args.per_device_eval_batch_size, self.data_collator, self.accelerator)
        return self._eval_loaders[key]

    def _prediction_loop(self, dataset: Any, prefix: str) -> PredictionOutput:
        if not self._is_setup and not self._prepared_for_eval:
            # scoring without training (evaluate / predict stages): put the model on the device once
            if self.args.bf16_full_eval:  # its weights too, not just autocast's matmuls (Trainer's bf16_full_eval)
                self.model = bf16_weights(self.model)
                logger.info("scoring with the weights in bf16 (trainer.bf16_full_eval)")
            self.model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
            self._prepared_for_eval = True
        return evaluation.prediction_loop(
            self.model, self._eval_dataloader(dataset), self.accelerator, self.task, prefix, dataset=dataset,
            compute_metrics=self.compute_metrics, preprocess_logits=self.preprocess_logits_for_metrics,
            seed=self.args.seed,
        )

    # --- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write every piece of state to checkpoints/step-N atomically (all ranks call this)."""
        self._settle()  # the loss sums are part of the state
        state = self.state
        if state.best_global_step == state.global_step:
            state.best_model_checkpoint = str(self.checkpoints.folder(state.global_step))
        state.stateful_callbacks = {type(cb).__name__: cb.state_dict() for cb in self.callback_handler.stateful()}
        state.stateful_callbacks["extra_state"] = self.extra_state
        folder = self.checkpoints.save(state, self.model, self.optimizer, self.lr_scheduler)
        self._last_saved_step = state.global_step
        self.control = self._fire("on_save", checkpoint=str(folder))
        return folder

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, scaler, trainer state, callbacks and this rank's RNG."""
        path = Path(path)
        self.checkpoints.check_loadable(path)
        resume.check_same_length(path, self.plan.num_steps, self.args.continue_training)
        logger.info("Resuming from checkpoint %s", path)
        self.state = self.checkpoints.load(path, self.model, self.optimizer, self.lr_scheduler,
                                           self.callback_handler.stateful(), seed=self.args.seed)
        self.extra_state = self.state.stateful_callbacks.get("extra_state", self.extra_state)
        if self.state.best_model_checkpoint is not None:
            # the path the saving machine wrote: this run's copy of that step in its own output_dir (a run resumed
            # elsewhere, or from a checkpoint fetched from the tracking server), else that path while it is there
            # or the step beside the checkpoint loaded (resumed from another run's folder: its best lies there)
            own = self.checkpoints.folder(self.state.best_global_step)
            found = [p for p in (own, Path(self.state.best_model_checkpoint), path.parent / own.name) if p.is_dir()]
            self.state.best_model_checkpoint = str(found[0] if found else own)
        # a killed run may have logged steps after this checkpoint: they will be logged again
        self.metrics_file.truncate_to(self.state.global_step)

    # --- final model -----------------------------------------------------------------------------
    def save_final(self) -> Path:
        """Write <output_dir>/final/ atomically: weights, config, tokenizer, train_result.json (all ranks call)."""
        result = getattr(self, "train_output", None)
        return self.checkpoints.save_final(self.model, self.tokenizer, {
            "global_step": self.state.global_step,
            "training_loss": result.training_loss if result else None,
            "metrics": result.metrics if result else {},
            "best_model_checkpoint": self.state.best_model_checkpoint,
            "best_metric": self.state.best_metric,
            "config_hash": self.config_hash,
        })

    def cleanup(self) -> None:
        self.metrics_file.close()
        self._eval_loaders.clear()
        with contextlib.suppress(Exception):
            self.accelerator.end_training()
