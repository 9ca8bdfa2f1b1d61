"""Entry point of one training run, under `accelerate launch` (or plain python for one process).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m trainer_core.run --spec spec.json
    accelerate launch --config_file <run_dir>/accelerate.yaml -m trainer_core.run --spec <run_dir>/spec.json

Reads the RunSpec (trainer_core.spec), the tokenized splits, the tokenizer and the batch plan, trains (resuming
from the newest complete checkpoint) and writes <output_dir>/final/. Exit code 0 means final/ exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from trainer_core.spec import RunSpec

logger = logging.getLogger("trainer_core")
DIVERGED_EXIT_CODE = 3
"""Exit code of a run stopped by trainer.stop_on_nonfinite (a retry would only diverge again)."""
PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: stopped on SIGTERM after a checkpoint (trainer.save_on_sigterm); running again resumes."""
DISK_FULL_EXIT_CODE = 4
"""A checkpoint did not fit: a retry now would fail the same way, running again after freeing space resumes."""


def _load_tokenizer(tokenizer_dir: str | None) -> Any:
    """The tokenizer the features were made with, or the image processor (vision families)."""
    if not tokenizer_dir or not Path(tokenizer_dir).exists():
        return None
    if (Path(tokenizer_dir) / "preprocessor_config.json").is_file() and not (
            Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(tokenizer_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_trainer(spec: RunSpec, model_dir: str | Path | None = None, with_train: bool = True) -> Any:
    """A Trainer for `spec`: on a fresh model for training, or on the saved model in `model_dir` (e.g.
    <output_dir>/final) for the evaluate / predict stages (no training data, no plan needed)."""
    import datasets
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from transformers import set_seed

    from trainer_core import load_report, zero
    from trainer_core.data import BatchPlan
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    load_report.one_line()  # transformers' multi-line LOAD REPORT table, once per rank, becomes one line
    task = get_task(spec.task.family)(spec.task)
    # cpu= as Accelerator itself reads it: a bare PartialState() does not join the gloo group on CPU, and the
    # Accelerator built later would inherit that single-process state
    state = PartialState(**zero.process_group_kwargs(parse_flag_from_env("ACCELERATE_USE_CPU")))
    # the main process first: a first read may write cache/index files that the others then reuse
    with state.main_process_first():
        splits = datasets.load_from_disk(spec.dataset_dir)
    train = splits[spec.task.train_split] if with_train and model_dir is None else None
    evaluation = splits[spec.task.eval_split] if spec.task.eval_split in splits else None
    tokenizer = _load_tokenizer(spec.tokenizer_dir)
    # same seed on every rank: the same initial weights everywhere, before DDP even broadcasts them
    set_seed(spec.args.seed)
    # the Accelerator before the model: under DeepSpeed ZeRO-3 with zero3_init_flag, transformers then builds the
    # model already partitioned over the ranks (no full copy per rank)
    accelerator = Trainer.make_accelerator(spec.args) if with_train and model_dir is None else None
    if model_dir is not None:
        from dataclasses import replace

        model = task.build_model(replace(spec.model, name_or_path=str(model_dir), config={}, revision=None))
        plan = None
    else:
        from trainer_core import adapters

        # LoRA wraps the family's model; final/ holds the merged model, so scoring above needs no adapter
        model = adapters.wrap(task.build_model(spec.model), spec.peft)
        plan = BatchPlan.load(spec.plan_path)
    args = spec.args
    if model_dir is not None:
        from dataclasses import replace

        # scoring only: no strategies that would need a training run
        args = replace(args, eval_strategy="no", load_best_model_at_end=False, early_stopping_patience=None,
                       callbacks=[])
    return Trainer(
        model, args, train_dataset=train, eval_dataset=evaluation, batch_plan=plan, output_dir=spec.output_dir,
        task=task, task_spec=spec.task, tokenizer=tokenizer, config_hash=spec.config_hash,
        config_components={**spec.config_components, **_adapter_components(spec)},
        mlflow_run_id=spec.mlflow_run_id, distributed=spec.distributed, accelerator=accelerator,
    )


def _adapter_components(spec: RunSpec) -> dict[str, Any]:
    from trainer_core import adapters

    return adapters.components(spec.peft) if spec.peft else {}


def _already_complete(spec: RunSpec) -> bool:
    """final/ exists only once a run has finished: a relaunch (Prefect retry) has nothing left to do."""
    import json

    result_path = Path(spec.output_dir) / "final" / "train_result.json"
    if not result_path.exists():
        return False
    found = json.loads(result_path.read_text()).get("config_hash")
    if found != spec.config_hash:
        raise ValueError(
            f"{result_path.parent} holds a model trained with config {found!r}, this run has config "
            f"{spec.config_hash!r}: use another output_dir."
        )
    logging.getLogger("trainer_core").warning("%s exists: training already completed.", result_path.parent)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="run spec JSON written by stages/train.py")
    cli = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = RunSpec.load(cli.spec)
    if _already_complete(spec):
        return 0
    trainer = build_trainer(spec)
    from trainer_core.checkpointing import CheckpointWriteFailed
    from trainer_core.trainer import TrainingDiverged, TrainingPreempted

    try:
        result = trainer.train()
        trainer.save_final()
        logger.info("Training done: global_step=%d training_loss=%.6f", result.global_step, result.training_loss)
    except TrainingDiverged as exc:
        # every rank stops at the same step; one line is enough (no traceback: nothing here is a bug)
        if trainer.accelerator.is_main_process:
            logger.error("%s", exc)
        return DIVERGED_EXIT_CODE
    except TrainingPreempted as exc:
        if trainer.accelerator.is_main_process:
            logger.warning("%s", exc)
        return PREEMPTED_EXIT_CODE
    except CheckpointWriteFailed as exc:
        if trainer.accelerator.is_main_process:
            logger.error("%s", exc)
        return DISK_FULL_EXIT_CODE
    finally:
        trainer.cleanup()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    code = main()
    # the interpreter's last collections walk every object torch and transformers made: ~1.5 s per rank at exit
    import gc

    gc.freeze()
    sys.exit(code)
