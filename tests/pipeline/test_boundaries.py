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


def test_the_schema_needs_no_hydra() -> None:
    """stages/schema.py is plain dataclasses: the stages (and their cache keys) do not depend on composition."""
    code = (
        "import sys\nimport stages.schema\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'flows', 'evaluate'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_stages_and_trainer_core_never_import_flows() -> None:
    import ast

    offenders = []
    for path in [*(REPO / "stages").rglob("*.py"), *(REPO / "trainer_core").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "flows" or n.startswith("flows.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
