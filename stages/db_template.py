"""Templates of freshly migrated SQLite databases (Prefect's, MLflow's), one per library version, in the user's cache.

    template = db_template.path("mlflow", "3.x")
    if not db_template.seed(database, template):   # no template yet: the library migrates the new database itself
        ...                                        # open it (migrates), then, before anything is written to it:
        db_template.save(database, template, scrub)

A new paths.root would otherwise re-run every migration of both stores (Prefect: 113, ~10 s on 2 cores; MLflow: ~1.5 s).
`scrub(copy)` edits the copy before it becomes the template and may refuse it (return False): a database that
already holds another flow's work must not seed other roots.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from trainer_core.files import user_cache_dir


def path(kind: str, version: str) -> Path:
    return user_cache_dir() / f"{kind}-{version}.db"


def seed(database: Path, template: Path) -> bool:
    """Give a new database the template's contents; False where there is no template yet (or only a file that is
    no SQLite database: deleted). Linked into place, so a process that created the same database meanwhile keeps
    the file it opened."""
    if not template.is_file():
        return False
    try:
        # immutable: a template is replaced whole, never written in place; a read-only open of a WAL database
        # (Prefect's) would otherwise leave -wal and -shm files beside it in the cache
        with contextlib.closing(sqlite3.connect(f"{template.as_uri()}?mode=ro&immutable=1", uri=True)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        template.unlink(missing_ok=True)
        return False
    partial = database.with_name(f".{database.name}.{os.getpid()}")
    try:
        shutil.copyfile(template, partial)
        os.link(partial, database)
    except FileExistsError:
        pass
    except OSError:
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


def save(database: Path, template: Path, scrub: Callable[[sqlite3.Connection], bool]) -> None:
    """A consistent copy of a just-migrated database (SQLite's backup reads through its write-ahead log), scrubbed,
    as the template. Best effort: a read-only cache only means the next new root migrates again."""
    partial = template.with_name(f".{template.name}.{os.getpid()}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as source, \
                contextlib.closing(sqlite3.connect(partial)) as copy:
            source.backup(copy)
            keep = scrub(copy)
            copy.commit()
        if not keep:
            partial.unlink()
            return
        os.replace(partial, template)
    except (OSError, sqlite3.Error):
        partial.unlink(missing_ok=True)
