"""Raw datasets: read, renamed to train / validation / test, and checked against the task config.

No Prefect here: the CLI's preflight calls `load_raw` before any flow starts, so that a dataset without the
configured text column, or with labels outside num_labels, is refused before anything expensive runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flows.config import ConfigError, TaskConfig
from stages.common import package_path
from stages.refs import file_sha256

SPLITS = ("train", "validation", "test")


def _package_file(task: TaskConfig) -> Path:
    path = package_path(task.package, task.package_file, f"task={task.name}")
    if not path.is_file():
        raise ConfigError(f"task.package_file={task.package_file!r}: not found in the package {task.package}.")
    if task.sha256 and (actual := file_sha256(path)) != task.sha256:
        raise ConfigError(
            f"task.sha256: {path} has SHA-256 {actual}, expected {task.sha256}. "
            f"The file differs from the tested release: reinstall the pinned {task.package} version."
        )
    return path


def _split_of(group: str, seed: int, fraction: float) -> str:
    # A stable hash of the group name, not Python's salted hash(): the same split on every machine.
    position = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:8], 16) / 2**32
    if position < fraction:
        return "test"
    return "validation" if position < 2 * fraction else "train"


def _load_rt_reviews(task: TaskConfig):
    """Rotten Tomatoes snippets: fresh → 1, rotten → 0, plot rows and empty texts dropped, split by movie."""
    import datasets
    import pandas as pd

    frame = pd.read_csv(_package_file(task), keep_default_na=False)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame[frame["text"].astype(str).str.strip() != ""]
    frame = frame.assign(label=(frame["category"] == "fresh").astype("int64"))
    split = frame["movie_name"].map(lambda movie: _split_of(str(movie), task.split_seed, task.validation_fraction))
    columns = [c for c in frame.columns if c not in ("category", "has_plot_and_reviews")]
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_pandas(frame.loc[split == name, columns], preserve_index=False)
            for name in SPLITS
        }
    )


def _load_hf(task: TaskConfig, cache_dir: Path):
    import datasets

    source = task.dataset_path or task.dataset
    # bars on stderr would bury the one-line error of a refused run (the env switch only works before import)
    datasets.disable_progress_bars()
    try:
        raw = datasets.load_dataset(source, task.subset, revision=task.revision, cache_dir=str(cache_dir))
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        key = "task.dataset_path" if task.dataset_path else "task.dataset"
        raise ConfigError(f"{key}={source!r} (subset {task.subset!r}) could not be loaded: {exc}") from None
    wanted = {"train": task.train_split, "validation": task.validation_split, "test": task.test_split}
    missing = [f"task.{name}_split={split!r}" for name, split in wanted.items() if split not in raw]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: no such split in {source} (splits: {', '.join(raw)}). Set it to one of them."
        )
    return datasets.DatasetDict({name: raw[split] for name, split in wanted.items()})


def load_raw(task: TaskConfig, root: str | Path):
    """The task's raw DatasetDict (train / validation / test), checked: columns present, labels in range."""
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(root) / "hf-datasets"))
    if task.loader == "rt_reviews":
        raw = _load_rt_reviews(task)
    else:
        raw = _load_hf(task, Path(root) / "hf-datasets")
    _check(raw, task)
    return raw


def _check(raw, task: TaskConfig) -> None:
    import numpy as np

    errors: list[str] = []
    for split, dataset in raw.items():
        for key in ("text_column", "text_pair_column", "label_column"):
            column = getattr(task, key)
            if column is not None and column not in dataset.column_names:
                errors.append(
                    f"task.{key}={column!r}: the {split} split has no such column "
                    f"(columns: {', '.join(dataset.column_names)}). Set task.{key} to one of them."
                )
    if errors:
        raise ConfigError("The dataset does not match the task config:\n - " + "\n - ".join(sorted(set(errors))))
    if task.num_labels == 1:
        return  # regression: any float is a label
    checked = ("train", "validation", "test") if task.test_has_labels else ("train", "validation")
    for split in checked:
        labels = np.asarray(raw[split][task.label_column])
        bad = labels[(labels < 0) | (labels >= task.num_labels)]
        if bad.size:
            raise ConfigError(
                f"task.num_labels={task.num_labels}: the {split} split has labels outside 0..{task.num_labels - 1} "
                f"({bad.size} rows, e.g. {sorted(set(bad.tolist()))[:5]}). Set task.num_labels to the number of "
                f"classes, or fix task.label_column={task.label_column!r}."
            )
