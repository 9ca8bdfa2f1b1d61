"""Cache keys: content-addressed, sensitive to the code a stage runs, and never trusting altered outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from flows.config import compose
from stages import batch_plan, prepare_data, train
from stages.caching import cache_key_fn, code_files, stage_dir, stage_key
from stages.refs import DatasetRef, dir_fingerprint
from stages.schema import PathsConfig

REPO = Path(__file__).resolve().parents[2]


def _rel(files) -> set[str]:
    return {str(f.relative_to(REPO)) for f in files}


def test_code_version_follows_imports_transitively() -> None:
    train_files = _rel(code_files(*train.CODE))
    # train launches trainer_core: all of it counts, and the helpers the stage imports count too
    assert {"trainer_core/trainer.py", "trainer_core/checkpoint.py", "stages/launch.py", "stages/schema.py"} <= train_files
    # Hydra composition and CLI wording are not code a stage runs; a sweep's prune callback is (in the ranks)
    assert "flows/pruning.py" in train_files
    assert not any(f.startswith("flows/") for f in train_files - {"flows/pruning.py"})
    prepare_files = _rel(code_files(*prepare_data.CODE))
    # an edited helper of prepare_data changes its key (Prefect's TASK_SOURCE would miss it) ...
    assert {"stages/prepare_data.py", "stages/common.py", "stages/caching.py", "stages/refs.py"} <= prepare_files
    # ... but editing the training loop does not invalidate tokenized data
    assert "trainer_core/trainer.py" not in prepare_files


def test_learning_rate_changes_train_key_but_not_the_data_stages() -> None:
    base, faster = compose([]), compose(["trainer.learning_rate=3e-5"])
    assert batch_plan.BatchGeometry.of(base.trainer, base.hardware) == batch_plan.BatchGeometry.of(
        faster.trainer, faster.hardware
    )
    data_keys = [stage_key("prepare_data", {"task": c.task, "model": c.model, "paths": c.paths}, prepare_data.CODE)
                 for c in (base, faster)]
    assert data_keys[0] == data_keys[1]
    train_keys = [stage_key("train", {"trainer": c.trainer, "run": None}, train.CODE) for c in (base, faster)]
    assert train_keys[0] != train_keys[1]
    # the MLflow run a stage reports to is not part of what it computes
    assert stage_key("train", {"trainer": base.trainer, "run": "a"}, train.CODE) == stage_key(
        "train", {"trainer": base.trainer, "run": "b"}, train.CODE
    )
    longer = compose(["task.max_seq_length=64"])
    assert stage_key("prepare_data", {"task": base.task}, prepare_data.CODE) != stage_key(
        "prepare_data", {"task": longer.task}, prepare_data.CODE
    )


@pytest.fixture
def results(tmp_path: Path):
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        (tmp_path / "results").mkdir()
        yield tmp_path / "results"


def test_a_record_whose_files_are_gone_or_altered_is_dropped(tmp_path: Path, results: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}"])
    params = {"task": cfg.task, "model": cfg.model, "paths": cfg.paths}
    key_fn = cache_key_fn("prepare_data", prepare_data.CODE)
    key = key_fn(None, params)
    record = results / key

    # a valid output: the record is kept, so Prefect serves the cached Ref
    out = stage_dir(cfg.paths.root, key)
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "data.arrow").write_bytes(b"rows")
    ref = DatasetRef(path=str(out), fingerprint=dir_fingerprint(out), num_rows={"train": 1}, input_columns=["text"],
                     vocab_size=10, tokenizer_fingerprint="x")
    ref.save(out / "ref.json")
    record.write_text("{}")
    assert key_fn(None, params) == key and record.exists()

    # altered bytes: the record goes, so the stage runs again instead of handing on a broken Ref
    (out / "dataset" / "data.arrow").write_bytes(b"rowz")
    assert key_fn(None, params) == key and not record.exists()

    # gone entirely: same
    record.write_text("{}")
    (out / "ref.json").unlink()
    key_fn(None, params)
    assert not record.exists()


def test_the_data_preflight_reads_the_raw_data_unless_prepare_data_holds_a_valid_result(tmp_path, monkeypatch):
    """A cached run skips loading the raw data (and importing datasets and torch); a first run, or one whose
    prepared data is gone or altered, checks the raw data before anything starts."""
    import stages.sources
    from flows.finetune import data_preflight

    loaded = []
    monkeypatch.setattr(stages.sources, "load_raw", lambda task, root, hand_over=False: loaded.append(task.name))
    cfg = compose([f"paths.root={tmp_path}"])
    data_preflight(cfg)  # nothing prepared under this root
    assert loaded == ["rt_reviews"]

    key = stage_key("prepare_data", {"task": cfg.task, "model": cfg.model, "paths": cfg.paths}, prepare_data.CODE)
    out = stage_dir(cfg.paths.root, key)
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "data.arrow").write_bytes(b"rows")
    DatasetRef(path=str(out), fingerprint=dir_fingerprint(out), num_rows={"train": 1}, input_columns=["text"],
               vocab_size=10, tokenizer_fingerprint="x").save(out / "ref.json")
    data_preflight(cfg)
    assert loaded == ["rt_reviews"]  # served from the stage's result: the raw data is not read

    data_preflight(compose([f"paths.root={tmp_path}", "task.max_train_samples=100"]))  # another key
    (out / "dataset" / "data.arrow").write_bytes(b"rowz")  # the prepared data altered: checked again
    data_preflight(cfg)
    assert loaded == ["rt_reviews"] * 3


def test_what_the_preflight_loaded_is_read_once_by_the_next_load(tmp_path) -> None:
    """The preflight's check and prepare_data read the same raw data in one process: loaded once, handed over once;
    any later load reads the files again (a long-lived process sees the data as it is then)."""
    from stages.sources import handed_over, load_raw

    task = compose([f"paths.root={tmp_path}"]).task
    assert not handed_over(task, tmp_path)
    checked = load_raw(task, tmp_path, hand_over=True)
    # the flow's CLI imports the tokenizer's modules while its API boots only where the stage will read this
    assert handed_over(task, tmp_path) and not handed_over(dataclasses.replace(task, max_train_samples=7), tmp_path)
    assert load_raw(task, tmp_path) is checked
    assert not handed_over(task, tmp_path)  # taken
    again = load_raw(task, tmp_path)
    assert again is not checked and again["train"].num_rows == checked["train"].num_rows
    handed = load_raw(task, tmp_path, hand_over=True)
    assert load_raw(dataclasses.replace(task, max_train_samples=7), tmp_path) is not handed  # another config
    assert load_raw(task, tmp_path) is handed  # still there for its own


def test_batch_geometry_holds_only_what_shapes_the_plan() -> None:
    fields = {f.name for f in dataclasses.fields(batch_plan.BatchGeometry)}
    assert "learning_rate" not in fields and "weight_decay" not in fields
    assert {"per_device_train_batch_size", "gradient_accumulation_steps", "seed", "world_size",
            "train_sampling_strategy"} <= fields


@pytest.mark.parametrize("strategy", ["group_by_length", "random", "sequential"])
def test_train_sampling_strategy_shapes_the_plan(tmp_path: Path, strategy: str) -> None:
    import datasets
    import numpy as np

    from trainer_core.data import BatchPlan, build_batch_plan

    lengths = [3, 9, 1, 7, 5, 2, 8, 4] * 5
    data_dir = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})}).save_to_disk(
        str(data_dir / "dataset")
    )
    data = DatasetRef.model_construct(path=str(data_dir))  # only its dataset folder is read
    cfg = compose(["trainer.max_steps=4", "trainer.per_device_train_batch_size=4",
                   f"trainer.train_sampling_strategy={strategy}"])
    geometry = batch_plan.BatchGeometry.of(cfg.trainer, cfg.hardware)
    ref = batch_plan.batch_plan.fn(data, geometry, PathsConfig(root=str(tmp_path / "state")))
    plan = BatchPlan.load(ref.path)
    # what the stage built before train_sampling_strategy existed: group_by_length=<bool>, always shuffled
    expected = {
        "group_by_length": build_batch_plan(40, 4, 1, 1, 4, cfg.trainer.seed, lengths=lengths, group_by_length=True),
        "random": build_batch_plan(40, 4, 1, 1, 4, cfg.trainer.seed),
        "sequential": build_batch_plan(40, 4, 1, 1, 4, cfg.trainer.seed, shuffle=False),
    }[strategy]
    assert np.array_equal(plan.micro_batches, expected.micro_batches)
    if strategy == "sequential":
        assert plan.micro_batches.ravel().tolist() == list(range(16))  # the dataset's order
