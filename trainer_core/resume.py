"""Which checkpoint a run resumes from, and whether it may: the resume policy of the TrainingArguments.

    path = resume_checkpoint(output_dir, args, model)    # None: start at step 0 (a warm start loads weights here)
    check_same_length(path, planned_steps=plan.num_steps, continue_training=args.continue_training)

In order: the run's own newest complete checkpoint (a relaunch), else trainer.resume_from_checkpoint (also of
another run folder; a final/ folder stands for its last checkpoint with trainer.continue_training), else nothing.
trainer.warm_start loads only the matching weights of the asked-for folder and starts a new run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from trainer_core import checkpoint as ckpt
from trainer_core.args import TrainingArguments

logger = logging.getLogger("trainer_core")


def resume_checkpoint(output_dir: Path, args: TrainingArguments, model: torch.nn.Module) -> Path | None:
    """The checkpoint to resume from: this run's newest complete one (a relaunch), else the one asked for.
    A warm start loads the asked-for weights into `model` (unwrapped) here and returns None (step 0)."""
    own = ckpt.find_resumable(output_dir)
    asked = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if own is not None and (asked is None or output_dir.resolve() not in asked.resolve().parents):
        if asked is not None:
            logger.info("This run already has checkpoint %s: resuming from it, not from %s", own, asked)
        return own
    if asked is None:
        return None
    if args.warm_start:
        from trainer_core import adapters

        adapter = (asked / "adapter_model.safetensors").is_file()  # final/adapter/ (PEFT's files)
        loaded, skipped = (adapters.load_adapter_folder if adapter else ckpt.load_warm_start)(model, asked)
        logger.info("Warm start from %s: loaded %d tensors, kept %d freshly initialised (%s); step 0, fresh "
                    "optimizer", asked, len(loaded), len(skipped), ", ".join(skipped[:8]))
        return None
    if (asked / "train_result.json").is_file() and not (asked / ckpt.MANIFEST).is_file():  # a final/ folder
        asked = _last_checkpoint_of_final(asked, args.continue_training)
    logger.info("Resuming from the checkpoint asked for (trainer.resume_from_checkpoint): %s", asked)
    return asked


def _last_checkpoint_of_final(final: Path, continue_training: bool) -> Path:
    if not continue_training:
        raise ValueError(
            f"Refusing to resume from {final}: it is a finished model (final/), not a checkpoint. To train "
            "that run further set trainer.continue_training=true (with a larger max_steps), or "
            "trainer.warm_start=true to start a new run from its weights."
        )
    step = json.loads((final / "train_result.json").read_text(encoding="utf-8"))["global_step"]
    last = ckpt.checkpoint_dir(final.parent, int(step))
    if ckpt.verify(last) is not None:
        raise ValueError(
            f"Cannot continue from {final}: its run has no complete checkpoint of step {step} ({last}) to "
            "take the optimizer and data position from. Point trainer.resume_from_checkpoint at one of its "
            "checkpoints, or use trainer.warm_start=true."
        )
    return last


def check_same_length(path: Path, planned_steps: int, continue_training: bool) -> None:
    """Resuming continues the same run: a checkpoint planned for another number of steps is refused unless
    trainer.continue_training asks to train it further."""
    saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    planned, step, now = int(saved.get("max_steps") or 0), int(saved.get("global_step", 0)), planned_steps
    if continue_training:
        if step >= now:
            raise ValueError(f"trainer.continue_training: {path} is at step {step} but this run plans {now} "
                             "steps: nothing to continue, raise trainer.max_steps (or num_train_epochs).")
        if planned != now:
            logger.info("Continuing %s (planned for %d steps) to %d steps", path, planned, now)
    elif planned and planned != now:
        raise ValueError(
            f"Refusing to resume from {path}: it belongs to a run of {planned} steps (at step {step}), this run "
            f"plans {now}. A resume continues the same run; to train it for more steps set "
            "trainer.continue_training=true, or start a new run (another output_dir)."
        )
