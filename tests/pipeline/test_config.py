"""Config composition: GLUE subsets, defaults, deprecated keys; bad keys, types and names fail with one clear message.

Every option of every group is composed and instantiated in tests/test_configs.py.
"""

from __future__ import annotations

import pytest

from flows.config import CONF_DIR, compose, glue_subsets
from stages.schema import ConfigError, flatten


@pytest.mark.parametrize("subset", sorted(glue_subsets()))
def test_glue_subsets_map_their_columns_like_run_glue(subset: str) -> None:
    cfg = compose(["task=glue", f"task.subset={subset}"])
    expected = glue_subsets()[subset]
    assert cfg.task.text_column == expected["text_column"]
    assert cfg.task.text_pair_column == expected["text_pair_column"]
    assert cfg.task.num_labels == expected["num_labels"]
    assert cfg.task.metrics == expected["metrics"] and cfg.task.label_names == expected["label_names"]
    assert cfg.task.name == f"glue-{subset}"
    assert cfg.registry.champion_metric == expected["metrics"][0]
    assert cfg.task.test_has_labels is False  # GLUE test labels are -1


def test_the_glue_table_is_data_not_a_task_option() -> None:
    table = CONF_DIR / "task" / "glue" / "subsets.yaml"
    assert table.is_file() and "subsets" not in {p.stem for p in (CONF_DIR / "task").glob("*.yaml")}
    assert {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"} == set(glue_subsets())


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


def test_default_trainer_uses_today_s_transformers_names() -> None:
    trainer = compose([]).trainer
    assert trainer.train_sampling_strategy == "group_by_length"
    assert trainer.warmup_steps == pytest.approx(0.1) and trainer.warmup_steps_for(250) == 25  # ceil(250 * 0.1)
    assert trainer.group_by_length is None and trainer.warmup_ratio is None


@pytest.mark.parametrize(
    "old,new,notice",
    [
        (["trainer.group_by_length=true"], {"train_sampling_strategy": "group_by_length"},
         "trainer.group_by_length is deprecated: use trainer.train_sampling_strategy=group_by_length"),
        (["trainer.group_by_length=false"], {"train_sampling_strategy": "random"},
         "trainer.group_by_length is deprecated: use trainer.train_sampling_strategy=random"),
        (["trainer.warmup_ratio=0.2"], {"warmup_steps": 0.2},
         "trainer.warmup_ratio is deprecated: use trainer.warmup_steps=0.2"),
        (["trainer.warmup_ratio=0.2", "trainer.warmup_steps=7"], {"warmup_steps": 7},  # a step count wins, as before
         "trainer.warmup_ratio is deprecated"),
    ],
)
def test_deprecated_trainer_keys_map_to_today_s_with_one_notice(monkeypatch, caplog, old, new, notice) -> None:
    import trainer_core.args

    monkeypatch.setattr(trainer_core.args, "_noticed", set())
    with caplog.at_level("WARNING", logger="trainer_core.args"):
        cfg = compose(old)
        compose(old)  # composed again in the same process (the flow does): no second notice
    assert {key: getattr(cfg.trainer, key) for key in new} == new
    notices = [r.getMessage() for r in caplog.records if r.name == "trainer_core.args"]
    assert len(notices) == len({o.split("=")[0] for o in old if "warmup_steps" not in o})
    assert any(n.startswith("notice: ") and notice in n for n in notices), notices
    assert all("\n" not in n for n in notices)


def test_a_deprecated_key_reads_like_its_new_name_in_the_cache_key() -> None:
    from stages.batch_plan import BatchGeometry

    old, new = compose(["trainer.group_by_length=true"]), compose(["trainer.train_sampling_strategy=group_by_length"])
    assert old.trainer == new.trainer
    assert BatchGeometry.of(old.trainer, old.hardware) == BatchGeometry.of(new.trainer, new.hardware)


def test_missing_dataset_path_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"task.dataset_path=.*no such folder"):
        compose(["task=glue", "task.dataset_path=/nonexistent/glue"])


@pytest.mark.parametrize("name", ["team/sentiment", "sentiment:v2", "critic's-model", ""])
def test_a_registry_name_mlflow_refuses_is_refused_before_training(name: str) -> None:
    # MLflow refuses '/' and ':' at create_registered_model, and a quote breaks the version lookup's filter
    # (the same weights would be registered again on every run): say so now, not after training
    with pytest.raises(ConfigError, match=r"registry.model_name="):
        compose([f"registry.model_name={name!r}" if name else "registry.model_name=''"])


def test_flattened_params_redact_secrets() -> None:
    cfg = compose(["tracking.uri=postgresql://alice:hunter2@127.0.0.1:5432/mlflow"])
    params = flatten(cfg)
    assert params["tracking.uri"] == "postgresql://alice:***@127.0.0.1:5432/mlflow"
    assert params["trainer.learning_rate"] == cfg.trainer.learning_rate
    assert all("hunter2" not in str(v) for v in params.values())
    assert flatten({"hub": {"token": "hf_abc"}}) == {"hub.token": "***"}


def test_the_flow_takes_the_command_line_s_config_only_for_the_same_overrides_and_once() -> None:
    from flows.config import composed, hand_over

    cli = compose(["trainer.learning_rate=3e-5"])
    hand_over(["trainer.learning_rate=3e-5"], cli)
    assert composed(["trainer.learning_rate=3e-5"]) is cli
    again = composed(["trainer.learning_rate=3e-5"])  # taken once: a second flow in the process composes
    assert again is not cli and again == cli
    hand_over(["trainer.learning_rate=3e-5"], cli)
    other = composed(["trainer.learning_rate=1e-4"])  # a flow with other overrides composes its own
    assert other.trainer.learning_rate == 1e-4
    assert composed(["trainer.learning_rate=3e-5"]) is not cli  # and the hand-over is gone


def test_a_target_mapping_on_the_command_line_composes() -> None:
    """`trainer.optimizer={_target_: ...}` (and loss, lr_scheduler, generation_config) replace a null default."""
    cfg = compose(["trainer.optimizer={_target_:torch.optim.SGD,momentum:0.9}",
                   "trainer.loss={_target_:trainer_core.losses.WeightedCrossEntropy,class_weights:[1.0,3.0]}",
                   "trainer.generation_config={num_beams:2}"])
    assert cfg.trainer.optimizer == {"_target_": "torch.optim.SGD", "momentum": 0.9}
    assert cfg.trainer.loss["class_weights"] == [1.0, 3.0]
    assert cfg.trainer.generation_config == {"num_beams": 2}
    assert compose([]).trainer.optimizer is None
