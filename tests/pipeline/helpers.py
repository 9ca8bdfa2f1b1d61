"""Functions behind the test fixtures (tests/conftest.py): GLUE-like folders, CLI runs, loopback servers.

Tests take them as fixtures (run_cli, run_module, glue_folder, prefect_server); FAST and report are plain values.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from stages.health import probe
from stages.launch import free_port  # noqa: F401 - the tests' free port is the launcher's

REPO = Path(__file__).resolve().parents[2]
FAST = [
    "model=tiny_bert",
    "trainer.learning_rate=1e-3",
    "trainer.max_steps=24",
    "trainer.per_device_train_batch_size=16",
    "trainer.logging_steps=4",
    "trainer.save_steps=12",
    "trainer.warmup_steps=0.1",
    "task.max_train_samples=512",
    "task.max_eval_samples=128",
    "task.max_predict_samples=128",
]
"""Overrides that shrink the default run to a few seconds of training."""

POSITIVE = "great wonderful moving funny brilliant charming sharp clever warm superb".split()
NEGATIVE = "dull boring clumsy tedious flat awful lifeless bland messy weak".split()
FILLER = "the film story cast plot script movie director scenes acting".split()


def sentence(rng: random.Random, positive: bool) -> str:
    """A short review-like sentence: three filler words and two of one sentiment."""
    words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words) + "."


def write_glue_folder(root: Path, rows_per_split: int = 96, seed: int = 0) -> Path:
    """A local folder laid out like the nyu-mll/glue Hub repo (README configs + <subset>/<split>-*.parquet)
    holding mrpc and sst2 with their real columns; test labels are -1 as on the Hub."""
    rng = random.Random(seed)
    configs = []
    for subset in ("mrpc", "sst2"):
        (root / subset).mkdir(parents=True, exist_ok=True)
        for split in ("train", "validation", "test"):
            rows = []
            for idx in range(rows_per_split):
                label = rng.randint(0, 1)
                if subset == "sst2":
                    rows.append({"sentence": sentence(rng, bool(label)), "label": label, "idx": idx})
                else:
                    first = sentence(rng, True)
                    second = first if label else sentence(rng, False)
                    rows.append({"sentence1": first, "sentence2": second, "label": label, "idx": idx})
            frame = pd.DataFrame(rows)
            if split == "test":
                frame["label"] = -1
            frame.to_parquet(root / subset / f"{split}-00000-of-00001.parquet", index=False)
        configs.append(
            f"- config_name: {subset}\n  data_files:\n"
            + "".join(f"  - split: {s}\n    path: {subset}/{s}-*\n" for s in ("train", "validation", "test"))
        )
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n# GLUE (generated for tests)\n")
    return root


def run_cli(overrides: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m flows.finetune <overrides>` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.finetune", *overrides],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def run_module(module: str, *args: str, env: dict[str, str] | None = None, timeout: int = 300):
    """`python -m <module> <args>` from the repository root, as a user runs it (MLFLOW_TRACKING_URI unset)."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def report(root: Path) -> dict:
    """The run's report (flows.finetune writes it to <paths.root>/last_report.json)."""
    return json.loads((root / "last_report.json").read_text())


def wait_http(url: str, timeout_s: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url` (a server's base URL) answers its /health probe; fails early if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        if probe(url, timeout_seconds=2) is None:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


class PrefectServer:
    """A real `prefect server start` on 127.0.0.1 with its own home; stopped on exit."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PrefectServer:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_API_URL": "",
        }
        prefect = Path(sys.executable).with_name("prefect")
        self.log = open(self.home / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(self.url, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()
