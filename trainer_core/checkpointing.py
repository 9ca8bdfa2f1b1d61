"""What a run saves and restores: its checkpoint folders and final/, through the atomic path of checkpoint.py.

    manager = CheckpointManager(output_dir, accelerator, strategy, config_hash=..., metrics_file=...)
    manager.save(state, model, optimizer, lr_scheduler)            # every rank; checkpoints/step-N committed
    state = manager.load(path, model, optimizer, lr_scheduler, callbacks, seed=args.seed)
    manager.save_final(model, tokenizer, train_result)             # every rank; final/ replaced atomically

The files of each topology (full weights, FSDP2 shards, DeepSpeed partitions) come from the strategy
(trainer_core.strategies); which checkpoint to resume from is trainer_core.resume's question.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer_core import adapters
from trainer_core import checkpoint as ckpt
from trainer_core.callbacks import MetricsFileCallback, TrainerCallback, TrainerState
from trainer_core.files import replace_dir, sync_tree
from trainer_core.spec import DISK_FULL
from trainer_core.strategies import Strategy

logger = logging.getLogger("trainer_core")

FINAL = "final"


class CheckpointWriteFailed(OSError):
    """A checkpoint did not fit (or could not be written): nothing partial is left, the previous one is kept."""


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class CheckpointManager:
    """Checkpoints and the final model of one run folder. Every method is called by all ranks."""

    def __init__(self, output_dir: str | Path, accelerator: Any, strategy: Strategy, *, config_hash: str = "",
                 mlflow_run_id: str | None = None, config_components: dict[str, Any] | None = None,
                 save_total_limit: int | None = None, metrics_file: MetricsFileCallback | None = None):
        self.output_dir = Path(output_dir)
        self.accelerator, self.strategy = accelerator, strategy
        self.config_hash, self.mlflow_run_id = config_hash, mlflow_run_id
        # the caller's dict, not a copy: components added after construction still reach the manifest
        self.config_components = config_components if config_components is not None else {}
        self.save_total_limit = save_total_limit
        self.metrics_file = metrics_file
        self._sized: tuple[Path, int] | None = None
        """(newest checkpoint, its size in bytes): measured once per checkpoint for the space checks."""

    def folder(self, step: int) -> Path:
        return ckpt.checkpoint_dir(self.output_dir, step)

    # --- checkpoints -----------------------------------------------------------------------------
    def save(self, state: TrainerState, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any) -> Path:
        """Write checkpoints/step-<global_step> atomically: every rank its files into the temp folder, then the
        main process the shared ones, the manifest last, and the rotation once it is committed.

        Space: before writing, the main process compares the free space with the size of the last checkpoint and
        refuses (nothing written) when it does not fit; a write that fails anyway (ENOSPC, quota) removes the
        temp folder. Either way every rank raises CheckpointWriteFailed at the same point (the ranks agree through
        a flag collective where they would otherwise only wait for each other) and the newest complete
        checkpoint stays what a resume finds."""
        acc = self.accelerator
        final = self.folder(state.global_step)
        tmp = final.with_name(f".tmp-{final.name}")
        problem = self._space_problem(final) if acc.is_main_process else None
        self._agree(problem, tmp)
        try:
            if acc.is_main_process:
                ckpt.begin(self.output_dir, state.global_step)
        except (OSError, RuntimeError) as exc:
            if (problem := self._write_problem(tmp, exc)) is None:
                raise
        self._agree(problem, tmp)
        try:
            ckpt.write_json(tmp / f"rng_state_{acc.process_index}.json", ckpt.rng_state())
            state_dict = self.strategy.save_state(model, optimizer, tmp)
        except (OSError, RuntimeError) as exc:
            if (problem := self._write_problem(tmp, exc)) is None:
                raise
        self._agree(problem, tmp)
        try:
            if acc.is_main_process:
                self.strategy.write_state(state_dict, optimizer, tmp)
                torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
                if acc.scaler is not None:
                    torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
                (tmp / "trainer_state.json").write_text(state.to_json(), encoding="utf-8")
                if self.metrics_file is not None:
                    self.metrics_file.sync()  # metrics.jsonl holds every step this checkpoint covers
                ckpt.commit(tmp, config_hash=self.config_hash, mlflow_run_id=self.mlflow_run_id,
                            global_step=state.global_step, config_components=self.config_components)
        except (OSError, RuntimeError) as exc:
            if (problem := self._write_problem(tmp, exc)) is None:
                raise
        self._agree(problem, tmp)
        if acc.is_main_process:
            logger.info("Saved checkpoint %s", final)
            ckpt.rotate(self.output_dir, self.save_total_limit, state.best_model_checkpoint)
            self._warn_if_short(final)
        acc.wait_for_everyone()
        return final

    def _newest_size(self) -> tuple[Path, int] | None:
        """The newest committed checkpoint and its size, or None before the first one."""
        previous = ckpt.list_checkpoints(self.output_dir)
        if not previous:
            return None
        if self._sized is None or self._sized[0] != previous[-1]:
            self._sized = (previous[-1], ckpt.tree_size(previous[-1]))
        return self._sized

    def _space_problem(self, final: Path) -> str | None:
        """Why checkpoint `final` will not fit (free space below the size of the newest one), or None."""
        if (newest := self._newest_size()) is None:
            return None  # nothing to estimate from: try, a failed write cleans up after itself
        (path, needed), free = newest, shutil.disk_usage(self.output_dir).free
        if free >= needed:
            return None
        return (f"checkpoint {final.name} needs about {_mb(needed)} (the size of {path.name}) but "
                f"{self.output_dir} has {_mb(free)} free; nothing was written")

    def _write_problem(self, tmp: Path, exc: Exception, what: str = "") -> str | None:
        """What a failed write (of checkpoint `tmp`, or `what`) says when the filesystem is full (or over quota),
        else None (not ours to explain). torch.save's zip writer reports ENOSPC as a RuntimeError: then the free
        space tells."""
        free = shutil.disk_usage(self.output_dir).free
        errno = getattr(exc, "errno", None)
        if errno == 122:
            full = "disk quota exceeded"
        elif errno == 28 or free < 2**20:
            full = "no space left on the device"
        else:
            return None
        newest = self._newest_size()
        needed = f", about {_mb(newest[1])} needed" if newest else ""
        where = getattr(exc, "filename", None) or tmp
        thing = what or f"checkpoint {tmp.name.removeprefix('.tmp-')}"
        return f"{thing}: {full} writing {where} ({_mb(free)} free{needed}); the partial {what or 'checkpoint'} was removed"

    def _agree(self, problem: str | None, tmp: Path) -> None:
        """Every rank learns whether any rank had a problem; then all raise together, the temp folder gone."""
        acc = self.accelerator
        failed = problem is not None
        if acc.num_processes > 1:
            flag = torch.tensor([float(failed)], device=acc.device)
            failed = bool(acc.reduce(flag, reduction="sum").item())  # the barrier this point needs anyway
        if not failed:
            return
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        if problem is not None:
            logger.error("rank %d: %s", acc.process_index, problem)
        kept = ckpt.list_checkpoints(self.output_dir)
        raise CheckpointWriteFailed(
            f"{DISK_FULL} {problem or 'another rank could not write its part of the checkpoint'}; "
            + (f"the newest complete checkpoint {kept[-1]} is kept" if kept else "no complete checkpoint yet")
            + ": free some space (or lower trainer.save_total_limit, or move paths.root) and run again to resume"
        )

    def _warn_if_short(self, final: Path) -> None:
        _, size = self._newest_size()  # `final`, just committed
        free = shutil.disk_usage(self.output_dir).free
        if free < 2 * size:
            logger.warning("%s has %s free, room for %d more checkpoint(s) of %s: free space before the next "
                           "save", self.output_dir, _mb(free), free // max(size, 1), _mb(size))

    def check_loadable(self, path: Path) -> None:
        """Refuse a folder that does not verify, holds unsafe files or comes from another config."""
        ckpt.check_loadable(path, self.config_hash, self.config_components)

    def load(self, path: Path, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any,
             callbacks: list[TrainerCallback], seed: int) -> TrainerState:
        """Restore model, optimizer, scheduler, scaler, callback states and this rank's RNG from a checkpoint that
        passed `check_loadable`; returns its TrainerState."""
        acc = self.accelerator
        self.strategy.check_kind(path)
        self.strategy.load_state(model, optimizer, path)
        lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if acc.scaler is not None and (path / "scaler.pt").exists():
            acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        state = TrainerState.from_json((path / "trainer_state.json").read_text(encoding="utf-8"))
        state.is_local_process_zero = acc.is_local_main_process
        state.is_world_process_zero = acc.is_main_process
        for callback in callbacks:
            if type(callback).__name__ in state.stateful_callbacks:
                callback.load_state_dict(state.stateful_callbacks[type(callback).__name__])
        self._restore_rng(path, state.global_step, seed)
        return state

    def load_best(self, model: torch.nn.Module, path: str | Path) -> None:
        """The best checkpoint's weights into `model` (load_best_model_at_end), once its manifest verifies: a copy
        altered since it was written (bit rot, a bad copy) must not become the final model. Every rank checks."""
        reason = ckpt.verify(path) if Path(path).is_dir() else "no such folder"
        if reason is not None:
            raise ValueError(
                f"Cannot load the best model (trainer.load_best_model_at_end) from {path}: {reason}. Its files are "
                "not the ones saved: restore that folder (e.g. from the tracking server's LoggedModel "
                f"checkpoint-{Path(path).name.removeprefix('step-')}) and run again, or train again in a new run."
            )
        self.strategy.load_weights(model, path)

    def _restore_rng(self, path: Path, step: int, seed: int) -> None:
        # RNG on a world size change (the plan keeps the global batch, each rank takes its share of it): rank r
        # restores rng_state_r when the checkpoint has it; a rank the saving run did not have takes rank 0's
        # python/numpy state and a torch generator seeded from (seed, step, rank), so no two ranks draw the same
        # dropout masks and the relaunch stays reproducible. Files of ranks beyond the new world are unused.
        acc = self.accelerator
        saved_ranks = len(list(path.glob("rng_state_*.json")))
        if saved_ranks != acc.num_processes:
            logger.warning("%s was written by %d rank(s), this run has %d: RNG restored per rank where present",
                           path, saved_ranks, acc.num_processes)
        rng_path = path / f"rng_state_{acc.process_index}.json"
        if rng_path.exists():
            ckpt.set_rng_state(json.loads(rng_path.read_text(encoding="utf-8")))
        else:
            ckpt.set_rng_state(json.loads((path / "rng_state_0.json").read_text(encoding="utf-8")))
            torch.manual_seed(seed * 1_000_003 + step * 1_009 + acc.process_index)

    # --- final model -----------------------------------------------------------------------------
    def save_final(self, model: torch.nn.Module, tokenizer: Any, train_result: dict[str, Any]) -> Path:
        """Write <output_dir>/final/ atomically: weights, config, tokenizer, train_result.json."""
        acc = self.accelerator
        final = self.output_dir / FINAL
        state_dict = self.strategy.full_state_dict(model)
        if acc.is_main_process:
            tmp = self.output_dir / f".tmp-{FINAL}"
            try:
                self._write_final(model, tokenizer, train_result, state_dict, tmp, final)
            except (OSError, RuntimeError) as exc:  # a full disk: the same error as a checkpoint's, nothing left
                if (problem := self._write_problem(tmp, exc, what="final model")) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                kept = ckpt.list_checkpoints(self.output_dir)
                raise CheckpointWriteFailed(
                    f"{DISK_FULL} {problem}; "
                    + (f"the newest complete checkpoint {kept[-1]} is kept" if kept else "no complete checkpoint")
                    + ": free some space (or move paths.root) and run again to write final/ from it"
                ) from exc
            logger.info("Saved final model to %s", final)
        acc.wait_for_everyone()
        return final

    def _write_final(self, model: torch.nn.Module, tokenizer: Any, train_result: dict[str, Any],
                     state_dict: dict[str, torch.Tensor], tmp: Path, final: Path) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = self.accelerator.unwrap_model(model)
        if adapters.is_adapted(unwrapped):  # LoRA: the merged model, and the adapter alone in adapter/
            adapters.save_final(unwrapped, tmp, **self.strategy.save_pretrained_kwargs())
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, **self.strategy.save_pretrained_kwargs())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "train_result.json").write_text(json.dumps(train_result, indent=2, sort_keys=True), encoding="utf-8")
        sync_tree(tmp)
        replace_dir(tmp, final)
