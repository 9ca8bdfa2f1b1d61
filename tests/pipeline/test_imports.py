"""A fully cached flow run imports only what it needs: the flow and its stages load without torch (each stage
imports torch in its body, when it really runs), so a cache hit pays for Prefect and MLflow, not for torch."""

from __future__ import annotations

import subprocess
import sys

from tests.pipeline.helpers import REPO


def test_the_flow_and_its_stages_import_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import flows.pipeline, flows.finetune; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
