"""A fully cached flow run imports only what it needs: the flow and its stages load without torch (each stage
imports torch in its body, when it really runs), so a cache hit pays for Prefect and MLflow, not for torch."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.pipeline.helpers import REPO
from trainer_core import precision


def _without_torch(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; " + code], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_the_flow_and_its_stages_import_without_torch() -> None:
    done = _without_torch("import flows.pipeline, flows.finetune; print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_composing_the_default_config_does_not_import_torch() -> None:
    # trainer.mixed_precision=auto resolves from the CPU's flags without torch
    done = _without_torch("from flows.config import compose; print(compose([]).trainer.mixed_precision)",
                          FINETUNE_MIXED_PRECISION="auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == precision.resolve("auto")[0]
