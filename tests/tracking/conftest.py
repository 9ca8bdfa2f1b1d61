"""Fixtures of the checkpoint-store tests: the real `mlflow server` of tests/serving (SQLite backend, artifacts
proxied into a tmp folder with --artifacts-destination), one per session."""

from tests.serving.conftest import mlflow_server  # noqa: F401 - the fixture, shared rather than copied
