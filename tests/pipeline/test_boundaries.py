"""trainer_core runs inside every rank: it must not drag in the orchestration stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_trainer_core_imports_nothing_from_prefect_hydra_or_mlflow() -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "trainer_core").rglob("*.py")
        if "metrics" not in p.parts  # evaluate metric scripts, loaded by path
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'hydra', 'mlflow', 'omegaconf'})\n"
        "print('LOADED', len(sys.modules), 'BAD', bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainer_core.trainer" in modules and "trainer_core.run" in modules  # the check covers the loop
    assert done.stdout.strip().endswith("BAD []"), done.stdout
