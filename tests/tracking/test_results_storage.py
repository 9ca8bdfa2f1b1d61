"""paths.results: where Prefect keeps the cached stages' records (a path or file:// URL, e.g. a shared mount)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import runtime
from flows.config import compose
from stages.schema import ConfigError


def test_results_default_to_the_root_and_take_a_path_or_file_url(tmp_path):
    assert runtime.results_path(tmp_path) == tmp_path.resolve() / "prefect" / "results"
    assert runtime.results_path(tmp_path, str(tmp_path / "shared")) == tmp_path / "shared"
    assert runtime.results_path(tmp_path, (tmp_path / "nfs").as_uri()) == tmp_path / "nfs"
    assert compose([f"paths.results={tmp_path / 'shared'}"]).paths.results == str(tmp_path / "shared")
    assert compose([]).paths.results is None


def test_a_results_url_the_stages_cannot_read_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"paths\.results=s3://bucket/finetune: .*mount"):
        runtime.configure(tmp_path, "s3://bucket/finetune")
    assert not Path(tmp_path / "prefect").exists()  # refused before anything was created
