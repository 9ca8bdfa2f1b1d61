"""Config composition: every shipped config composes; bad keys, types and names fail with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import CONF_DIR, GLUE_SUBSETS, ConfigError, compose, flatten

GROUPS = ("task", "model", "hardware", "trainer", "tracking", "registry", "paths")


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))],
)
def test_every_shipped_config_composes(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    node = getattr(cfg, group)
    if hasattr(node, "name"):
        assert option in node.name  # the file we asked for is the one that was used
    assert Path(cfg.paths.root).is_absolute()


@pytest.mark.parametrize("subset", sorted(GLUE_SUBSETS))
def test_glue_subsets_map_their_columns_like_run_glue(subset: str) -> None:
    cfg = compose(["task=glue", f"task.subset={subset}"])
    expected = GLUE_SUBSETS[subset]
    assert cfg.task.text_column == expected["text_column"]
    assert cfg.task.text_pair_column == expected["text_pair_column"]
    assert cfg.task.num_labels == expected["num_labels"]
    assert cfg.task.name == f"glue-{subset}"
    assert cfg.registry.champion_metric == expected["metrics"][0]
    assert cfg.task.test_has_labels is False  # GLUE test labels are -1


def test_mnli_uses_its_matched_splits() -> None:
    cfg = compose(["task=glue", "task.subset=mnli"])
    assert (cfg.task.validation_split, cfg.task.test_split) == ("validation_matched", "test_matched")


def test_default_is_the_offline_task_and_model() -> None:
    cfg = compose([])
    assert (cfg.task.name, cfg.model.name, cfg.hardware.name) == ("rt_reviews", "minilm_l6", "cpu")
    assert cfg.model.trust_remote_code is False
    assert cfg.registry.model_name == "rt_reviews-minilm_l6"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["task=imdb"], ["task/imdb", "glue", "rt_reviews"]),
        (["model=gpt5"], ["model/gpt5", "tiny_bert", "minilm_l6"]),
        (["hardware=tpu"], ["hardware/tpu", "ddp_2cpu"]),
        (["trainer.learnig_rate=1e-3"], ["learnig_rate", "TrainingArguments"]),
        (["trainer.learning_rate=fast"], ["learning_rate", "fast", "Float"]),
        (["trainer.max_steps=1.5"], ["max_steps", "1.5"]),
        (["task=glue", "task.subset=squad"], ["task.subset", "squad", "mrpc"]),
    ],
)
def test_bad_names_keys_and_types_are_refused_at_compose_time(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message
    assert "_schema" not in message  # our schema entries are not options to offer


def test_cross_field_problems_are_collected_into_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        compose([
            "trainer.warmup_ratio=1.5",
            "trainer.load_best_model_at_end=true",
            "trainer.eval_strategy=steps",
            "trainer.save_strategy=epoch",
            "trainer.metric_for_best_model=bleu",
        ])
    message = str(info.value)
    assert message.startswith("Config is not well-formed")
    for key in ("trainer.warmup_ratio", "trainer.load_best_model_at_end", "trainer.metric_for_best_model"):
        assert key in message


def test_missing_dataset_path_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"task.dataset_path=.*no such folder"):
        compose(["task=glue", "task.dataset_path=/nonexistent/glue"])


def test_flattened_params_redact_secrets() -> None:
    cfg = compose(["tracking.uri=postgresql://alice:hunter2@127.0.0.1:5432/mlflow"])
    params = flatten(cfg)
    assert params["tracking.uri"] == "postgresql://alice:***@127.0.0.1:5432/mlflow"
    assert params["trainer.learning_rate"] == cfg.trainer.learning_rate
    assert all("hunter2" not in str(v) for v in params.values())
    assert flatten({"hub": {"token": "hf_abc"}}) == {"hub.token": "***"}
