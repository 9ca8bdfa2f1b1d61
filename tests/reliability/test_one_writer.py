"""One writer per stage key: flows that compute the same stage at the same moment compute it once.

Unit tier: the key lock (`stages.caching.key_lock`) makes a second holder wait, and a lock whose holder was
SIGKILLed is free at once. Integration tier: four identical flows started together on one paths.root.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from stages.caching import key_lock
from tests.pipeline.helpers import REPO

HOLD = """
import sys, time
from stages.caching import key_lock
import logging
with key_lock(sys.argv[1], logging.getLogger("t")):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_holder_waits_for_the_first(tmp_path) -> None:
    folder, events = tmp_path / "train-abc", []

    def second() -> None:
        with key_lock(folder, logging.getLogger("t")):
            events.append("second")

    with key_lock(folder, logging.getLogger("t")):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        events.append("first done")
    thread.join(timeout=10)
    assert events == ["first done", "second"]
    assert (tmp_path / "train-abc.lock").read_text().strip() == str(os.getpid())


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog) -> None:
    folder = tmp_path / "train-abc"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def take() -> None:
            with key_lock(folder, logging.getLogger("t"), "train"):
                got.set()

        with caplog.at_level(logging.INFO, logger="t"):
            thread = threading.Thread(target=take, daemon=True)
            thread.start()
            assert not got.wait(1.0), "the lock was taken while its holder lived"
            assert f"another process (pid {holder.pid}) is computing train-abc" in caplog.text
            os.kill(holder.pid, signal.SIGKILL)
            assert got.wait(10.0), "the lock of a killed process was not taken over"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration
def test_four_identical_flows_at_once_train_once_and_register_one_version(tmp_path) -> None:
    from mlflow import MlflowClient

    root = tmp_path / "state"
    overrides = ["model=tiny_bert", "trainer.max_steps=8", "trainer.save_steps=4", "task.max_train_samples=128",
                 "task.max_eval_samples=32", "task.max_predict_samples=32", f"paths.root={root}"]
    procs = [subprocess.Popen([sys.executable, "-m", "flows.finetune", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], "\n\n".join(o[-2000:] for o in outputs)
    launched = [o for o in outputs if "accelerate.commands.launch --config_file" in o]
    assert len(launched) == 1, "exactly one trainer ran"
    assert sum(o.count("register: created") for o in outputs) == 1
    assert sum(o.count("prepare_data: {'train': 128") for o in outputs) == 1
    db = f"sqlite:///{root / 'mlflow.db'}"
    versions = MlflowClient(tracking_uri=db, registry_uri=db).search_model_versions("name = 'rt_reviews-tiny_bert'")
    assert len(versions) == 1
    # every flow ended on the one trained model
    reports = [line.split("Registered model:")[1].split("(")[0].strip() for o in outputs for line in o.splitlines()
               if line.startswith("Registered model:")]
    assert reports == ["rt_reviews-tiny_bert version 1"] * 4
