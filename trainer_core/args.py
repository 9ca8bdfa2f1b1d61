"""Training arguments under the Hugging Face `TrainingArguments` names.

The same dataclass is the Hydra schema of the `trainer` config group (stages/schema.py, composed by
flows/config.py) and the arguments of `trainer_core.Trainer`, so a key means one thing everywhere.

Keys renamed by transformers keep working under their old name, with a one-line notice naming the new key:
`group_by_length` -> `train_sampling_strategy`, `warmup_ratio` -> `warmup_steps` (a value < 1 is a ratio).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
STRATEGIES = ("no", "steps", "epoch")
OPTIMS = ("adamw_torch", "adamw_torch_fused")
PRECISIONS = ("auto", "no", "fp16", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "passive")
SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")
COMPILE_MODES = ("default", "lite", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
"""torch.compile's modes for the inductor backend (torch._inductor.list_mode_options() of the pinned torch)."""

log = logging.getLogger(__name__)
_noticed: set[str] = set()


def _notice_deprecated(old: str, new: str) -> None:
    """One line per deprecated key and process (a config is composed several times per run)."""
    if old not in _noticed:
        _noticed.add(old)
        log.warning("notice: trainer.%s is deprecated: use trainer.%s", old, new)


@dataclass
class TrainingArguments:
    # --- steps and batches -------------------------------------------------------------------
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW (reached after warmup)."""
    num_train_epochs: float = 3.0
    """Epochs to train; ignored when max_steps > 0."""
    max_steps: int = -1
    """Optimizer steps to train; wins over num_train_epochs when > 0."""
    per_device_train_batch_size: int = 8
    """Samples per process per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Samples per process per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""

    # --- optimisation ------------------------------------------------------------------------
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    save_on_sigterm: bool = True
    """On SIGTERM (preemption: spot instances, Kubernetes, SLURM's --signal; the flow's Ctrl-C) the ranks agree to
    stop at the next step boundary, write a checkpoint of that step and exit; the next run resumes from it. False:
    the default signal action (the process dies, the last periodic checkpoint is what a resume finds)."""
    stop_on_nonfinite: bool = True
    """Stop at the first optimizer step whose loss or gradient norm is NaN or inf (all ranks at once, one error
    naming the step). False: keep going like transformers.Trainer. An fp16 step that the grad scaler skips for an
    overflow is not a divergence."""
    lr_scheduler_type: str = "linear"
    """One of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the scheduler (e.g. num_cycles, power)."""
    warmup_steps: float = 0
    """Optimizer steps of linear warmup; a value < 1 is a ratio of the total steps (ceil(total * ratio))."""
    optim: str = "adamw_torch"
    """adamw_torch (torch's AdamW, its default foreach / for-loop kernel) or adamw_torch_fused (one fused kernel
    per parameter group: faster on CUDA and on CPU, and transformers.Trainer's default since torch 2.8; its floats
    differ from adamw_torch's in the last bits). Ignored when trainer.optimizer names a class. Note the default of
    this dataclass, adamw_torch, is not transformers.Trainer's (adamw_torch_fused); conf/trainer/default.yaml sets
    adamw_torch_fused."""
    # these four are mappings or None, typed Any: OmegaConf cannot merge a command line's mapping into a typed
    # null (`trainer.optimizer={_target_: ...}` would crash in Hydra); validate() checks that they are mappings
    optimizer: Any = None
    """`{_target_: torch.optim.SGD, momentum: 0.9}`: an optimizer class called with (param_groups, lr=...)."""
    lr_scheduler: Any = None
    """`{_target_: ...}`: a scheduler class called with (optimizer, **kwargs); replaces lr_scheduler_type."""
    loss: Any = None
    """`{_target_: trainer_core.losses.WeightedCrossEntropy, class_weights: [1.0, 3.0]}`: replaces the task loss."""
    seed: int = 42
    """Seeds the batch plan, and Python / numpy / torch in `trainer_core.run` before the model is built (a new head's
    initial weights, then dropout). Unlike transformers.Trainer, `Trainer(...)` itself does not re-seed: code that
    builds one in-process seeds first (`transformers.set_seed(args.seed)`) for dropout to follow the seed."""

    # --- precision and memory ----------------------------------------------------------------
    mixed_precision: str = "no"
    """no (fp32), fp16 or bf16 (through Accelerate), or auto: bf16 where the hardware runs it natively (CUDA Ampere
    or newer, a CPU with AMX / AVX512-BF16), else no (trainer_core.precision.resolve). conf/ defaults to auto."""
    bf16_full_eval: bool = False
    """Score a finished model (the evaluate and predict stages) with its weights cast to bf16, not just under
    mixed_precision's autocast: faster, half the memory, metrics may move slightly. As in transformers.Trainer,
    evaluations while training keep the training weights as they are; the trained weights do not depend on it."""
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    """Compile the model's forward with torch.compile (in place: the checkpoints' names do not change)."""
    torch_compile_backend: str | None = None
    """torch.compile's backend (None: inductor)."""
    torch_compile_mode: str | None = None
    """torch.compile's mode (e.g. max-autotune-no-cudagraphs)."""
    pad_to_multiple_of: int | None = None
    """Pad each batch's sequence length up to a multiple of this (shape buckets: a compiled model sees few
    shapes, and tensor cores like multiples of 8); None pads to the longest row, or to 16 with torch_compile."""

    # --- regularisation ----------------------------------------------------------------------
    label_smoothing_factor: float = 0.0
    """Label smoothing of the task's cross-entropies, training and evaluation loss alike (as transformers'
    LabelSmoother). Unlike transformers.Trainer, which smooths only a `labels` input along the last logits
    dimension, it also smooths question answering's start / end positions and segmentation's pixel classes;
    regression's MSE and a trainer.loss hook are left as they are."""
    neftune_noise_alpha: float | None = None
    """NEFTune: uniform noise on input embeddings during training only."""
    train_sampling_strategy: str = "random"
    """Order of the train samples: random (seeded shuffle), sequential (dataset order) or group_by_length
    (shuffled, then samples of similar length batched together: less padding)."""

    # --- generation (Seq2SeqTrainingArguments names; families that generate) -------------------
    predict_with_generate: bool | None = None
    """Evaluate and predict with `generate` (seq2seq, causal_lm). None: the task family's default."""
    generation_max_length: int | None = None
    """Tokens generated per example at evaluation (generate's max_new_tokens; None: the family's default)."""
    generation_num_beams: int | None = None
    generation_config: Any = None
    """Further GenerationConfig fields for evaluation, e.g. {no_repeat_ngram_size: 3}."""

    # --- strategies --------------------------------------------------------------------------
    logging_steps: int = 10
    """Log every logging_steps optimizer steps (a whole number, as eval_steps and save_steps: no ratios); note the
    default, 10 (transformers.TrainingArguments: 500), which eval_steps also falls back to."""
    logging_first_step: bool = False
    eval_strategy: str = "no"
    eval_steps: int | None = None
    """Evaluate every eval_steps optimizer steps (eval_strategy=steps), and at the last step (as transformers 5);
    defaults to logging_steps."""
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    """Keep at most this many checkpoints; the best one is never deleted."""
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    """Name of an eval metric, with or without the `eval_` prefix (default: loss)."""
    greater_is_better: bool | None = None
    """Defaults to False for metrics ending in loss, True otherwise."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement (needs an eval strategy)."""
    early_stopping_threshold: float = 0.0
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    """`[{_target_: my_pkg.MyCallback, arg: 1}]`: TrainerCallback classes added to the run."""

    # --- logging -----------------------------------------------------------------------------
    log_level: str = "info"
    """Log level of the main process."""
    log_level_replica: str = "warning"
    """Log level of the other processes."""
    log_on_each_node: bool = True
    """With several machines, log from the local main process of each (else only the global one)."""
    disable_tqdm: bool = False

    # --- resume ------------------------------------------------------------------------------
    resume_from_checkpoint: str | None = None
    """None: resume from the newest complete checkpoint of the run, if any. A path: that checkpoint (also one of
    another run folder); it must come from the same model, task and data, and the same number of steps unless
    continue_training is set. Once this run has checkpoints of its own, a relaunch resumes from those."""
    continue_training: bool = False
    """Train a finished (or shorter) run further: with resume_from_checkpoint pointing at its last checkpoint
    (or its final/ folder, whose last checkpoint is used) and a larger max_steps / num_train_epochs, resume the
    full state and add the missing steps. Without it, a checkpoint planned for another number of steps is refused."""
    warm_start: bool = False
    """With resume_from_checkpoint: load only the model weights (tensors whose name and shape match, e.g. another
    task's encoder) and start a new run at step 0 with a fresh optimizer, schedule and data order."""

    # --- deprecated names (mapped onto today's in __post_init__, then cleared) ------------------
    group_by_length: bool | None = None
    """Deprecated: train_sampling_strategy=group_by_length (true) or random (false)."""
    warmup_ratio: float | None = None
    """Deprecated: warmup_steps=<ratio> (a value < 1 is a ratio)."""

    def __post_init__(self) -> None:
        if self.group_by_length is not None:
            strategy = "group_by_length" if self.group_by_length else "random"
            _notice_deprecated("group_by_length", f"train_sampling_strategy={strategy}")
            self.train_sampling_strategy, self.group_by_length = strategy, None
        if self.warmup_ratio is not None:
            valid = 0.0 <= self.warmup_ratio < 1.0  # else kept, for validate() to name it
            _notice_deprecated("warmup_ratio", f"warmup_steps={self.warmup_ratio if valid else '<ratio>'} "
                                               "(a value < 1 is a ratio of the steps)")
            if valid:
                if self.warmup_steps < 1:  # as before: a step count (>= 1) wins over the ratio
                    self.warmup_steps = self.warmup_ratio
                self.warmup_ratio = None

    def validate(self) -> list[str]:
        """Every problem with these arguments, as 'key: what is wrong and what to do'."""
        errors: list[str] = []

        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                errors.append(f"trainer.{name}={getattr(self, name)}: must be > 0.")

        for name in ("optimizer", "lr_scheduler", "loss", "generation_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                what = "GenerationConfig fields" if name == "generation_config" else "_target_: package.module.Name, ..."
                errors.append(f"trainer.{name}={value!r}: must be a mapping ({{{what}}}) or null.")
        for name in ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps"):
            positive(name)
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            errors.append(f"trainer.pad_to_multiple_of={self.pad_to_multiple_of}: must be > 0 (e.g. 8), or null.")
        for name in ("generation_max_length", "generation_num_beams"):  # else generate refuses it, after training
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"trainer.{name}={getattr(self, name)}: must be >= 1, or null (the family's default).")
        if self.optim not in OPTIMS:
            errors.append(f"trainer.optim={self.optim!r}: use one of {', '.join(OPTIMS)} (or trainer.optimizer: "
                          "{_target_: <class>} for any other optimizer).")
        # torch's AdamW refuses these only once the ranks build it, after the data is prepared (and on each retry)
        if not self.optimizer:
            for name in ("adam_beta1", "adam_beta2"):
                if not 0.0 <= getattr(self, name) < 1.0:
                    errors.append(f"trainer.{name}={getattr(self, name)}: must be within [0, 1) (e.g. 0.9 / 0.999).")
            if self.adam_epsilon < 0:
                errors.append(f"trainer.adam_epsilon={self.adam_epsilon}: must be >= 0 (e.g. 1e-8).")
        if self.weight_decay < 0:
            errors.append(f"trainer.weight_decay={self.weight_decay}: must be >= 0 (0: no decay).")
        if not 0 <= self.seed < 2**32:  # numpy's seeds (the batch plan's, set_seed's): else a late, unnamed failure
            errors.append(f"trainer.seed={self.seed}: must be within [0, 2**32) (e.g. trainer.seed=42).")
        if self.torch_compile and self.torch_compile_backend in (None, "inductor") \
                and self.torch_compile_mode is not None and self.torch_compile_mode not in COMPILE_MODES:
            errors.append(f"trainer.torch_compile_mode={self.torch_compile_mode!r}: use one of {', '.join(COMPILE_MODES)}, "
                          "or null (default).")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            errors.append("trainer.max_steps / trainer.num_train_epochs: set max_steps > 0 or num_train_epochs > 0.")
        if self.warmup_ratio is not None:
            errors.append(f"trainer.warmup_ratio={self.warmup_ratio}: must be within [0, 1) (a fraction of the steps); "
                          "better, use trainer.warmup_steps (a value < 1 is a ratio).")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            errors.append(f"trainer.warmup_steps={self.warmup_steps}: use a whole number of steps, or a ratio "
                          "of the steps in [0, 1).")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            errors.append(f"trainer.train_sampling_strategy={self.train_sampling_strategy!r}: use one of "
                          f"{', '.join(SAMPLING_STRATEGIES)}.")
        if self.lr_scheduler_type not in SCHEDULERS and self.lr_scheduler is None:
            errors.append(f"trainer.lr_scheduler_type={self.lr_scheduler_type!r}: use one of {', '.join(SCHEDULERS)}.")
        if self.mixed_precision not in PRECISIONS:
            errors.append(f"trainer.mixed_precision={self.mixed_precision!r}: use one of {', '.join(PRECISIONS)}.")
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in STRATEGIES:
                errors.append(f"trainer.{name}={getattr(self, name)!r}: use one of {', '.join(STRATEGIES)}.")
        for name in ("log_level", "log_level_replica"):
            if getattr(self, name) not in LOG_LEVELS:
                errors.append(f"trainer.{name}={getattr(self, name)!r}: use one of {', '.join(LOG_LEVELS)}.")
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and value != int(value):  # transformers reads a value < 1 as a ratio
                errors.append(f"trainer.{name}={value}: use a whole number of optimizer steps (a ratio of the "
                              "steps, as transformers reads a value < 1, is not supported).")
        if self.save_strategy == "steps" and self.save_steps <= 0:
            errors.append(f"trainer.save_steps={self.save_steps}: must be > 0 with save_strategy=steps.")
        if self.eval_strategy == "steps" and self.eval_steps is not None and self.eval_steps <= 0:
            errors.append(f"trainer.eval_steps={self.eval_steps}: must be > 0 with eval_strategy=steps.")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            errors.append(f"trainer.save_total_limit={self.save_total_limit}: must be > 0 or null (keep all).")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            errors.append(f"trainer.label_smoothing_factor={self.label_smoothing_factor}: must be within [0, 1).")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            errors.append(f"trainer.neftune_noise_alpha={self.neftune_noise_alpha}: must be > 0 or null (off).")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                errors.append("trainer.load_best_model_at_end=true needs an eval strategy: set trainer.eval_strategy to steps or epoch.")
            elif self.save_strategy != self.eval_strategy:
                errors.append(
                    f"trainer.load_best_model_at_end=true needs save_strategy to match eval_strategy "
                    f"(got save_strategy={self.save_strategy!r}, eval_strategy={self.eval_strategy!r}): set both to the same value."
                )
            elif self.eval_strategy == "steps" and self.save_steps % self.resolved_eval_steps() != 0:
                errors.append(
                    f"trainer.load_best_model_at_end=true needs save_steps ({self.save_steps}) to be a multiple of "
                    f"eval_steps ({self.resolved_eval_steps()}): every checkpoint must have been evaluated."
                )
        if self.warm_start and not self.resume_from_checkpoint:
            errors.append("trainer.warm_start=true needs trainer.resume_from_checkpoint=<checkpoint or final/ folder>.")
        if self.warm_start and self.continue_training:
            errors.append("trainer.warm_start and trainer.continue_training exclude each other: warm_start loads only "
                          "the weights, continue_training the whole state; set one of them.")
        if self.continue_training and not self.resume_from_checkpoint:
            errors.append("trainer.continue_training=true needs trainer.resume_from_checkpoint=<the run's last "
                          "checkpoint or its final/ folder>.")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience <= 0:
                errors.append(f"trainer.early_stopping_patience={self.early_stopping_patience}: must be > 0 or null (off).")
            if self.eval_strategy == "no":
                errors.append("trainer.early_stopping_patience needs evaluations: set trainer.eval_strategy to steps or epoch.")
        return errors

    # --- derived quantities ------------------------------------------------------------------
    def sequence_multiple(self) -> int | None:
        """What batches' sequence lengths are rounded up to: pad_to_multiple_of, else 16 when compiling."""
        if self.pad_to_multiple_of is None and self.torch_compile:
            return 16
        return self.pad_to_multiple_of

    def resolved_eval_steps(self) -> int:
        return self.eval_steps if self.eval_steps else self.logging_steps

    def best_metric_key(self) -> str:
        """The metric compared for the best model, with the `eval_` prefix."""
        name = self.metric_for_best_model or "loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    def resolved_greater_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.best_metric_key().endswith("loss")

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps for a run of total_steps optimizer steps: warmup_steps, or ceil(total * it) when < 1 (as HF)."""
        return int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(total_steps * self.warmup_steps)

    def shuffles(self) -> bool:
        """Whether the batch plan shuffles the train samples (all strategies but sequential)."""
        return self.train_sampling_strategy != "sequential"

    def groups_by_length(self) -> bool:
        return self.train_sampling_strategy == "group_by_length"
