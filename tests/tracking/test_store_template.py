"""A new root's MLflow store starts from a template of MLflow's migrated schema, and is what MLflow would make."""

import sqlite3
from importlib.metadata import version

from stages import db_template
from stages.tracking import client, ensure_store


def _rows(database, sql):
    with sqlite3.connect(database) as con:
        return con.execute(sql).fetchall()


def test_the_first_new_store_saves_the_schema_and_the_next_one_copies_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = db_template.path("mlflow", version("mlflow"))
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    ensure_store(f"sqlite:///{first}")
    assert template.is_file()
    # the schema at MLflow's head revision, and no experiment: not even Default, whose location is the store's own
    assert _rows(template, "SELECT version_num FROM alembic_version") == _rows(first, "SELECT version_num FROM alembic_version")
    assert _rows(template, "SELECT count(*) FROM experiments") == [(0,)]
    stamp = template.stat().st_mtime_ns

    mlflow = client(f"sqlite:///{first}")
    mlflow.create_run(mlflow.create_experiment("work"))  # work in the first root never reaches the template
    ensure_store(f"sqlite:///{first}")
    ensure_store(f"sqlite:///{second}")
    assert template.stat().st_mtime_ns == stamp
    assert _rows(second, "SELECT count(*) FROM runs") == [(0,)]
    fresh = client(f"sqlite:///{second}")
    # MLflow added Default (id 0) on opening the copy, as it does in a store it migrated; ids continue from there
    assert fresh.get_experiment("0").artifact_location == client(f"sqlite:///{first}").get_experiment("0").artifact_location
    assert fresh.create_experiment("work") == "1"


def test_a_bad_template_is_replaced_and_the_store_migrates(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = db_template.path("mlflow", version("mlflow"))
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")
    database = tmp_path / "root" / "mlflow.db"
    ensure_store(f"sqlite:///{database}")
    assert client(f"sqlite:///{database}").get_experiment("0").name == "Default"
    assert _rows(template, "SELECT count(*) FROM experiments") == [(0,)]  # saved again, from the migrated store


def test_checking_a_wal_template_leaves_nothing_beside_it(tmp_path):
    """Prefect's database (so its template) is in WAL mode: checking it before the copy writes no -wal / -shm."""
    template = tmp_path / "cache" / "prefect-x.db"
    template.parent.mkdir()
    con = sqlite3.connect(template)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE flow_run (id TEXT)")
    con.commit()
    con.close()  # the last connection checkpoints and removes its -wal / -shm
    assert sorted(p.name for p in template.parent.iterdir()) == ["prefect-x.db"]
    database = tmp_path / "root" / "prefect.db"
    database.parent.mkdir()
    assert db_template.seed(database, template)
    assert sorted(p.name for p in template.parent.iterdir()) == ["prefect-x.db"]
    assert _rows(database, "SELECT count(*) FROM flow_run") == [(0,)]
