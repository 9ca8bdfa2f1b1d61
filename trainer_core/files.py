"""Files that survive a crash: SHA-256 of files and folders, fsync, atomic writes of files and folders.

    from trainer_core.files import sha256_file, write_json_atomic, replace_dir
    write_json_atomic(path, {"a": 1})        # readers see the old file or the new one, never half of one

The one place for these helpers: checkpoints, stage outputs, Refs and metric files all use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 over every file's relative path and content: changes when any byte or name changes."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, payload: Any, **dump_kwargs: Any) -> None:
    """Write JSON to a temporary sibling (one per process and thread: sweep trials write the same files at once),
    fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    options = {"indent": 2, "sort_keys": True, "default": str, **dump_kwargs}
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, **options)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sync_tree(path: str | Path) -> None:
    """fsync every file of a folder (recursively), then the folders themselves."""
    root = Path(path)
    for file in root.rglob("*"):
        if file.is_file():
            fsync_file(file)
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
    fsync_dir(root)


def remove_dir(path: str | Path) -> None:
    """Delete a folder by renaming it aside first (`.old-<name>`), then removing that: a crash meanwhile leaves no
    half of it under its name."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    shutil.rmtree(old)


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a fully written (and synced) folder into place; an existing `final` is replaced whole.

    The old folder is first renamed aside, so a crash leaves either the old or the new one under `final`.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        remove_dir(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def user_cache_dir() -> Path:
    """This project's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache): what can be recomputed at any
    time (stages/caching's code facts, flows/temporary_api's database template)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"
