"""What evaluate and predict share: a trainer_core Trainer on the finished model, in this process."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from stages.refs import DatasetRef, ModelRef
from trainer_core.spec import RunSpec


def inference_trainer(model: ModelRef, data: DatasetRef, out_dir: Path, bf16_full_eval: bool = False) -> Any:
    """A Trainer on model.path that scores `data`; it writes its logs into out_dir, not the training run. Its
    logger says warnings only: the stage logs its own one-line result through Prefect's logger.

    bf16_full_eval is this stage's (trainer.bf16_full_eval of the flow run), not the training run's: the flow trains
    with it off (the weights do not depend on it), so turning it on re-scores a cached model."""
    wait_for_warm_up()
    from trainer_core.run import build_trainer

    trained = RunSpec.load(model.spec_path)
    spec = dataclasses.replace(
        trained, args=dataclasses.replace(trained.args, log_level="warning", bf16_full_eval=bf16_full_eval),
        dataset_dir=data.dataset_dir,
        tokenizer_dir=data.tokenizer_dir, output_dir=str(out_dir),
    )
    return build_trainer(spec, model_dir=model.path, with_train=False)


BF16_NOTE = {False: "", True: " (weights in bf16: trainer.bf16_full_eval)"}
"""What the stage's one-line result adds when it scored in bf16 weights."""


def by_length(dataset: Any, family: Any) -> tuple[Any, np.ndarray]:
    """The rows sorted by length (far less padding per batch) and the permutation that restores their order.

    Inputs without a length (images) keep their order."""
    lengths = family.lengths(dataset)
    order = np.arange(len(dataset)) if lengths is None else np.argsort(lengths, kind="stable")
    return dataset.select(order), np.argsort(order)


WARM_MODULES = ("trainer_core.run", "trainer_core.trainer", "transformers.modeling_utils", "transformers.trainer_utils",
                "evaluate", "sklearn.metrics", "matplotlib.figure", "matplotlib.backends.backend_agg")
"""What scoring a finished model imports first (~4 s on 2 cores: transformers' modeling stack, peft through
transformers.trainer_utils, evaluate, scikit-learn's metrics), and the classification report's plot after
predict (matplotlib, ~0.5 s)."""


_warming: threading.Thread | None = None
"""The warm-up thread of this process, if one was started (inference_trainer waits for it)."""


def wait_for_warm_up() -> None:
    """Until the warm-up thread (if any) is done: no two threads import the same packages at once (a circular
    import may then see a module half-initialised). On the CPU the ranks just freed, it costs nothing extra."""
    if _warming is not None:
        _warming.join()


def warm_up() -> threading.Thread | None:
    """Import WARM_MODULES in a thread at nice 19 while the ranks start and train, so that the evaluate stage that
    follows in this process finds them imported (~2.5 s less per cold run, measured alternating on 2 cores).

    The ranks start one process at a time (the launcher, then each rank importing torch), leaving a core idle:
    that is where it runs. Its nice value yields to this process's other threads; the ranks, in their own session
    (a scheduler autogroup of their own), compete with it only as one group with another. Linux only (a thread's
    own nice value); None elsewhere, where this process imported them already, or while its warm-up runs."""
    global _warming
    if sys.platform != "linux" or all(name in sys.modules for name in WARM_MODULES):
        return None
    if _warming is not None and _warming.is_alive():  # another flow of this process (a sweep trial) started one
        return None

    def run() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread's own nice value only
        for name in WARM_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a missing optional module: the stage that needs it reports it
                continue

    _warming = threading.Thread(target=run, name="warm-up-imports", daemon=True)
    _warming.start()
    return _warming
