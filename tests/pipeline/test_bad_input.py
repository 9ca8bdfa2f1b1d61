"""Bad input: a non-zero exit before training, one message naming the key and the fix, nothing written."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.config import compose
from flows.finetune import main
from stages.schema import ConfigError

pytestmark = pytest.mark.usefixtures("restore_environ")


@pytest.fixture(scope="module")
def glue(glue_folder) -> Path:
    return glue_folder(rows_per_split=16)


@pytest.fixture(scope="module")
def glue_bad_labels(glue_folder) -> Path:
    root = glue_folder(rows_per_split=16)
    train = root / "sst2" / "train-00000-of-00001.parquet"
    frame = pd.read_parquet(train)
    frame.loc[3, "label"] = 7
    frame.to_parquet(train, index=False)
    return root


def _fails(capsys, root: Path, overrides: list[str], *fragments: str) -> None:
    code = main([*overrides, f"paths.root={root}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    # nothing half-written: no MLflow store (so nothing registered), no stage outputs, no run folder
    assert not (root / "mlflow.db").exists()
    assert not (root / "stages").exists()


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["task=sentiment140"], ["task/sentiment140", "Available options", "rt_reviews"]),
        (["model=llama"], ["model/llama", "tiny_bert"]),
        (["hardware=fsdp_16gpu"], ["hardware/fsdp_16gpu", "ddp_2cpu"]),
        (["trainer.num_train_epoch=3"], ["num_train_epoch", "TrainingArguments names"]),
        (["trainer.per_device_train_batch_size=thirty-two"], ["per_device_train_batch_size", "thirty-two"]),
        (["task=glue", "task.dataset_path=/no/such/glue"], ["task.dataset_path=/no/such/glue", "no such folder"]),
        (["trainer.mixed_precision=fp16"], ["trainer.mixed_precision=fp16", "needs a GPU"]),
    ],
)
def test_config_errors(capsys, tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    _fails(capsys, tmp_path, overrides, *fragments)


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        # refused only by the register stage, after training
        (["registry.model_name=team/reviews"], ["registry.model_name='team/reviews'", "registry.model_name=team-reviews"]),
        # refused only by torch, in the ranks, after the data is prepared (and on every retry)
        (["trainer.adam_beta1=1.5"], ["trainer.adam_beta1=1.5", "[0, 1)"]),
        (["trainer.weight_decay=-0.1"], ["trainer.weight_decay=-0.1", ">= 0"]),
        (["model.dropout=1.5"], ["model.dropout=1.5", "[0, 1]"]),
        # refused only by generate, at the evaluation after training
        (["trainer.generation_num_beams=0"], ["trainer.generation_num_beams=0", ">= 1"]),
        (["trainer.generation_max_length=0"], ["trainer.generation_max_length=0", ">= 1"]),
        # refused by numpy in the batch_plan stage, with a message that names no key
        (["trainer.seed=-1"], ["trainer.seed=-1", "[0, 2**32)"]),
        # a documented form that crashed in OmegaConf with a traceback; a value that is no mapping is named
        (["trainer.optimizer=sgd"], ["trainer.optimizer='sgd'", "_target_"]),
        (["trainer.optimizer={_target_:torch.optim.Nope}"], ["trainer.optimizer", "torch.optim.Nope", "cannot be imported"]),
        # refused only in the ranks, after the data is prepared (and on every retry)
        (["trainer.resume_from_checkpoint=/no/such/ckpt"], ["trainer.resume_from_checkpoint=/no/such/ckpt", "no such folder"]),
        (["trainer.callbacks=[{_target_:nope.Callback}]"], ["trainer.callbacks[0]", "nope.Callback", "cannot be imported"]),
        # 0 silently meant every row
        (["task.max_train_samples=0"], ["task.max_train_samples=0", ">= 1, or null"]),
        # MLflow refused these inside the flow, naming no key
        (["tracking.experiment_name=''"], ["tracking.experiment_name is empty"]),
        (["tracking.uri=foo://bar"], ["tracking.uri=foo://bar", "no store for 'foo'"]),
        (["trainer.torch_compile=true", "trainer.torch_compile_mode=fast"], ["trainer.torch_compile_mode='fast'", "max-autotune"]),
        # Hydra's own hint for a misspelt key ("use +trainer.learnin_rate=..."): the key was kept and never read
        (["+trainer.learnin_rate=1e-3"], ["trainer.learnin_rate", "no such key", "drop the +"]),
    ],
)
def test_refused_at_compose_time(tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    """Values that used to pass the checks and fail later (in a stage, in the ranks, in MLflow) or not at all."""
    with pytest.raises(ConfigError) as info:
        compose([*overrides, f"paths.root={tmp_path}"])
    for fragment in fragments:
        assert fragment in str(info.value), info.value
    assert not any(tmp_path.iterdir())


def test_dataset_without_the_text_column(capsys, tmp_path: Path, glue: Path) -> None:
    _fails(
        capsys, tmp_path,
        ["task=glue", "task.subset=sst2", f"task.dataset_path={glue}", "task.text_column=review"],
        "task.text_column='review'", "no such column", "sentence",
    )


def test_labels_outside_num_labels(capsys, tmp_path: Path, glue_bad_labels: Path) -> None:
    _fails(
        capsys, tmp_path,
        ["task=glue", "task.subset=sst2", f"task.dataset_path={glue_bad_labels}"],
        "task.num_labels=2", "outside 0..1", "[7]",
    )


def test_missing_split_names_the_split_key(capsys, tmp_path: Path, glue: Path) -> None:
    _fails(
        capsys, tmp_path, ["task=glue", "task.subset=sst2", f"task.dataset_path={glue}", "task.test_split=test_matched"],
        "task.test_split='test_matched'", "no such split",
    )


def test_the_real_command_exits_non_zero_without_a_traceback(run_cli, tmp_path: Path) -> None:
    done = run_cli(["trainer.learning_rate=abc", f"paths.root={tmp_path}"], timeout=120)
    assert done.returncode == 2
    assert "trainer.learning_rate=abc" in done.stderr and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_root_that_cannot_be_a_folder_is_named(capsys, tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    root = blocker if where == "a file" else blocker / "root"
    code = main([f"paths.root={root}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert f"paths.root={root}" in err and "a folder you can write" in err
    assert blocker.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_results_bucket_that_does_not_answer_is_refused_before_anything_starts(capsys, monkeypatch, tmp_path: Path) -> None:
    s3fs = pytest.importorskip("s3fs")
    from tests.pipeline.helpers import free_port

    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)  # nothing listens there
    s3fs.S3FileSystem.clear_instance_cache()
    root = tmp_path / "state"
    assert main([f"paths.root={root}", "paths.results=s3://records/finetune"]) == 2
    err = capsys.readouterr().err
    assert "paths.results=s3://records/finetune: the result storage does not answer" in err and "Traceback" not in err
    assert not root.exists()  # no temporary Prefect API, no MLflow store, no stage
    s3fs.S3FileSystem.clear_instance_cache()
