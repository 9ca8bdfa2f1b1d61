"""paths.results: where Prefect keeps the cached stages' records: a path, a file:// URL (e.g. a shared mount) or the
URL of any fsspec filesystem, here a real S3-compatible server on 127.0.0.1 (moto's, through s3fs).

The stage keys hold paths.root (a Ref is a folder on it), so workers share cache hits when they share paths.root
(the same mount point) and the records; with remote records no worker needs the records' folder mounted. What
the test shows on the S3 server: a stage's record lands in the bucket (nothing in Prefect's local storage), the
next flow run is served from it, and a record whose stage folder is gone is deleted from the bucket by the key
function, so the stage runs again cleanly instead of handing on a broken Ref.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows import runtime
from flows.config import compose
from stages.schema import ConfigError
from tests.pipeline.helpers import FAST, free_port


def test_results_default_to_the_root_and_take_a_path_or_file_url(tmp_path):
    assert runtime.results_location(tmp_path) == str(tmp_path.resolve() / "prefect" / "results")
    assert runtime.results_location(tmp_path, str(tmp_path / "shared")) == str(tmp_path / "shared")
    assert runtime.results_location(tmp_path, (tmp_path / "nfs").as_uri()) == str(tmp_path / "nfs")
    assert compose([f"paths.results={tmp_path / 'shared'}"]).paths.results == str(tmp_path / "shared")
    assert compose([]).paths.results is None


def test_a_results_url_whose_package_is_missing_is_refused_naming_the_key_and_the_package(tmp_path):
    pytest.importorskip("s3fs")
    assert runtime.results_location(tmp_path, "s3://bucket/finetune/") == "s3://bucket/finetune"
    with pytest.raises(ConfigError, match=r"paths\.results=oci://bucket/finetune: .*needs the package ocifs"):
        runtime.configure(tmp_path, "oci://bucket/finetune")  # Oracle's fsspec package: not installed here
    with pytest.raises(ConfigError, match=r"paths\.results=nope://x: fsspec knows no protocol 'nope'"):
        runtime.configure(tmp_path, "nope://x")
    assert not Path(tmp_path / "prefect").exists()  # refused before anything was created


def _s3_environment(monkeypatch, endpoint: str) -> None:
    """What s3fs reads (AWS_*); its cached filesystem instances would keep another test's endpoint."""
    s3fs = pytest.importorskip("s3fs")
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback, one bucket; fsspec/s3fs reach it through the AWS_* environment."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    _s3_environment(monkeypatch, endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="records")
    try:
        yield client
    finally:
        server.stop()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def test_a_results_bucket_that_does_not_answer_or_exist_is_refused_naming_the_key(s3, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"paths\.results=s3://missing/finetune: its bucket does not exist"):
        runtime.result_storage(tmp_path, "s3://missing/finetune")
    _s3_environment(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConfigError, match=r"paths\.results=s3://records/finetune: the result storage does not answer"):
        runtime.result_storage(tmp_path, "s3://records/finetune")


def test_stage_records_live_in_the_bucket_are_reused_and_dropped_there(s3, prefect_server, tmp_path):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import _run
    from stages.caching import stage_dir
    from stages.prepare_data import prepare_data

    local = tmp_path / "local-results"
    cfg = compose([*FAST, f"paths.root={tmp_path / 'root'}", "paths.results=s3://records/team/finetune"])

    @flow
    def data_stage() -> tuple[str, object]:
        report: dict[str, str] = {}
        ref = _run(prepare_data, cfg.task, cfg.model, cfg.paths, report=report,
                   storage=runtime.result_storage(cfg.paths.root, cfg.paths.results))
        return report["prepare_data"], ref

    def records() -> dict[str, bytes]:
        listed = s3.list_objects_v2(Bucket="records", Prefix="team/finetune/").get("Contents", [])
        return {o["Key"]: s3.get_object(Bucket="records", Key=o["Key"])["Body"].read() for o in listed}

    with temporary_settings({PREFECT_API_URL: prefect_server.url, PREFECT_HOME: str(tmp_path / "home"),
                             PREFECT_RESULTS_LOCAL_STORAGE_PATH: local}):
        how, ref = data_stage()
        assert how == "ran"
        key = Path(ref.path).name
        first = records()
        assert list(first) == [f"team/finetune/{key}"]  # the record is in the bucket, as JSON (no pickle)
        assert ref.path in json.loads(first[f"team/finetune/{key}"])["result"]
        assert not (local / key).exists()

        how, again = data_stage()  # another flow run: served from the bucket's record
        assert (how, again) == ("cached", ref)

        shutil.rmtree(stage_dir(cfg.paths.root, key))  # the record's files are gone (another worker's root)
        how, rebuilt = data_stage()
        assert how == "ran" and rebuilt.is_valid()  # the key function deleted the bucket's record
        assert list(records()) == [f"team/finetune/{key}"]
