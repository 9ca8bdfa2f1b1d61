"""All nine GLUE subsets end to end from a local folder laid out like the Hub repo (the users' load_dataset
call): STS-B as regression (Pearson / Spearman), CoLA with Matthews correlation, MNLI on validation_matched and
validation_mismatched (both reported), QQP and MRPC with F1; test splits (labels -1) predicted, not scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tasks.glue_data import write_glue

pytestmark = pytest.mark.integration

EXPECTED = {
    "cola": {"matthews_correlation"}, "sst2": {"accuracy"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"},
    "stsb": {"pearsonr", "spearmanr"}, "qnli": {"accuracy"}, "rte": {"accuracy"}, "wnli": {"accuracy"},
    "mnli": {"accuracy", "matched_accuracy", "mismatched_accuracy"},
}


@pytest.fixture(scope="module")
def glue_runs(tmp_path_factory):
    """One Prefect test harness, one flow run per subset (in-process: the start-up is paid once)."""
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows import runtime

    folder = write_glue(tmp_path_factory.mktemp("glue"), rows_per_split=24)
    root = tmp_path_factory.mktemp("glue-root")
    runtime.configure(root)
    from flows.pipeline import finetune

    reports = {}
    with prefect_test_harness():
        for subset in EXPECTED:
            reports[subset] = finetune([
                "task=glue", f"task.subset={subset}", f"task.dataset_path={folder}", "model=tiny_bert",
                "trainer.max_steps=3", "trainer.per_device_train_batch_size=8", "trainer.logging_steps=1",
                "trainer.save_strategy=no", f"paths.root={root}", "registry.champion_threshold=-1e9",
            ])
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return reports


@pytest.mark.parametrize("subset", list(EXPECTED))
def test_every_glue_subset_runs_end_to_end(glue_runs, subset):
    import math

    report = glue_runs[subset]
    validation = {k.removeprefix("validation_") for k in report["metrics"] if k.startswith("validation_")}
    assert EXPECTED[subset] | {"loss"} <= validation, validation
    assert all(math.isfinite(v) for v in report["metrics"].values())
    # GLUE test labels are -1: predicted, never scored
    assert not any(k.startswith("test_") for k in report["metrics"])
    rows = [json.loads(line) for line in Path(report["predictions"]).read_text().splitlines()]
    assert len(rows) == 24 and "true_label" not in rows[0]
    assert report["model_name"] == f"glue-{subset}-tiny_bert" and "candidate" in report["aliases"]
    if subset == "stsb":  # regression: a real-valued prediction per pair, no class names
        assert all(isinstance(r["label"], float) for r in rows)
    elif subset == "mnli":
        assert {r["label"] for r in rows} <= {"entailment", "neutral", "contradiction"}
        assert report["metrics"]["validation_accuracy"] == report["metrics"]["validation_matched_accuracy"]
