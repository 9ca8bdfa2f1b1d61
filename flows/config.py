"""Config composition: Hydra composes conf/ against the schema of stages/schema.py into plain dataclasses.

    from flows.config import compose
    cfg = compose(["task=glue", "trainer.learning_rate=3e-5"])

Structured configs make Hydra reject unknown keys and wrong types at compose time; `stages.schema.validate`
adds the cross-field checks and raises one `ConfigError` naming every key that is wrong and how to fix it.
Only this module (and the CLIs) import Hydra: the stages see the dataclasses, nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

from stages.schema import (  # noqa: F401 - re-exported: `from flows.config import compose, FinetuneConfig`
    ConfigError,
    FinetuneConfig,
    HardwareConfig,
    ModelConfig,
    PathsConfig,
    PeftConfig,
    RegistryConfig,
    StagesConfig,
    TaskConfig,
    TrackingConfig,
    flatten,
    stable_hash,
    validate,
)
from trainer_core.args import TrainingArguments

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GLUE_TABLE = CONF_DIR / "task" / "glue" / "subsets.yaml"
"""The GLUE subsets' columns, classes, metrics and splits, read by the ${glue:<subset>,<key>} resolver."""


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
        ("peft", PeftConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


# --- compose -----------------------------------------------------------------------------------


@functools.cache
def glue_subsets() -> dict[str, dict[str, Any]]:
    """{subset: {text_column, text_pair_column, num_labels, label_names, metrics, validation_split, test_split,
    extra_validation_splits}}."""
    import yaml

    table = yaml.safe_load(GLUE_TABLE.read_text())
    return {name: {**table["default_splits"], **entry} for name, entry in table["subsets"].items()}


def _glue_resolver(subset: str, key: str) -> Any:
    subsets = glue_subsets()
    if subset not in subsets:
        raise ConfigError(f"task.subset={subset!r} is not a GLUE subset: use one of {', '.join(subsets)}.")
    return subsets[subset][key]


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


_handed_over: tuple[tuple[str, ...], FinetuneConfig] | None = None


def hand_over(overrides: list[str] | tuple[str, ...], cfg: FinetuneConfig) -> None:
    """The command line composed these overrides already: the flow it calls next takes this config (`composed`)
    instead of composing them again (same process and environment, a moment later; ~0.3 s)."""
    global _handed_over
    _handed_over = (tuple(overrides), cfg)


def composed(overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """The config handed over for exactly these overrides (taken once), else compose(overrides)."""
    global _handed_over
    handed, _handed_over = _handed_over, None
    if handed is not None and handed[0] == tuple(overrides):
        return handed[1]
    return compose(overrides)


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
    if unknown := _appended_keys(cfg):
        raise ConfigError(
            f"Invalid configuration: {', '.join(unknown)}: no such key in the schema (stages/schema.py, "
            "trainer_core/args.py), so nothing would read it. Check the spelling (trainer keys use Hugging Face "
            "TrainingArguments names) and drop the +."
        )
    cfg.paths.root = str(Path(os.path.expanduser(cfg.paths.root)).resolve())
    _resolve_precision(cfg)
    if cfg.registry.champion_metric is None:
        cfg.registry.champion_metric = cfg.task.metrics[0]
    _fill_metric_directions(cfg)
    _fit_sampling_to_family(cfg, overrides)
    if cfg.task.dataset_path:
        cfg.task.dataset_path = str(Path(os.path.expanduser(cfg.task.dataset_path)).resolve())
    validate(cfg)
    return cfg


def _appended_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys appended with `+` to a schema group (`+trainer.learnin_rate=1e-3`, as Hydra's own hint suggests):
    OmegaConf.to_object keeps them as plain attributes that nothing reads, so a typo would pass unnoticed."""
    if not dataclasses.is_dataclass(node):
        return []
    names = [f.name for f in dataclasses.fields(node)]
    unknown = [f"{prefix}{key}" for key in vars(node) if key not in names]
    for name in names:
        unknown += _appended_keys(getattr(node, name), f"{prefix}{name}.")
    return unknown


def _resolve_precision(cfg: Any) -> None:
    """trainer.mixed_precision: a hardware config's precision where the trainer leaves it at auto or no (FSDP
    configs train in bf16); otherwise auto is bf16 where this machine runs it natively, else no. Resolved here, so
    the concrete value is what the cache keys, MLflow and the lineage see."""
    from trainer_core.precision import AUTO, resolve

    requested = cfg.trainer.mixed_precision
    if cfg.hardware.mixed_precision and requested in (AUTO, "no"):
        cfg.trainer.mixed_precision = cfg.hardware.mixed_precision
        if requested == AUTO:
            cfg.auto["trainer.mixed_precision"] = f"{cfg.hardware.mixed_precision} (hardware={cfg.hardware.name})"
    elif requested == AUTO:
        value, why = resolve(AUTO, use_cpu=cfg.hardware.use_cpu)
        cfg.trainer.mixed_precision = value
        cfg.auto["trainer.mixed_precision"] = f"{value} ({why})"


def _fit_sampling_to_family(cfg: Any, overrides: list[str] | tuple[str, ...]) -> None:
    """The default trainer groups batches by length; a family without lengths (images) samples at random
    instead, unless the command line asked for grouping (then the preflight refuses it by name)."""
    from trainer_core.tasks import families

    family = families().get(cfg.task.family)
    asked = any("train_sampling_strategy" in o or "group_by_length" in o for o in overrides)
    if family is not None and not family.has_length and not asked \
            and cfg.trainer.train_sampling_strategy == "group_by_length":
        cfg.trainer.train_sampling_strategy = "random"


def _fill_metric_directions(cfg: Any) -> None:
    """Where the config leaves a metric's direction open, the task family says it (perplexity: lower)."""
    from trainer_core.tasks import families

    family = families().get(cfg.task.family)
    directions = family.greater_is_better if family is not None else {}
    if cfg.registry.greater_is_better is None:
        cfg.registry.greater_is_better = directions.get(cfg.registry.champion_metric.removeprefix("eval_"), True)
    best = (cfg.trainer.metric_for_best_model or "").removeprefix("eval_")
    if cfg.trainer.greater_is_better is None and best in directions:
        cfg.trainer.greater_is_better = directions[best]


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
