"""The batch plan: every global micro-batch of a run, decided once, before training.

    plan = build_batch_plan(num_samples=1000, global_micro_batch_size=16, gradient_accumulation_steps=2,
                            num_train_epochs=3, max_steps=-1, seed=42)
    plan.save("plan.npz"); plan = BatchPlan.load("plan.npz")

A global micro-batch is a row of `G = per_device_train_batch_size * world_size` sample indices (-1 pads the
last short batch of an epoch). Optimizer step `s` uses rows `step_starts[s]:step_starts[s + 1]`, so a resume
at step k jumps straight to its rows. Each rank takes a contiguous chunk of a row (`shard`), so ranks never
see the same sample and the order does not depend on the world size of the run that resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PAD = -1
MEGABATCH_MULT = 50
"""Like transformers' LengthGroupedSampler: sort by length within megabatches of 50 micro-batches."""


@dataclass
class BatchPlan:
    micro_batches: np.ndarray
    """int64 [num_micro_batches, G]: sample indices, -1 padding."""
    step_starts: np.ndarray
    """int64 [num_steps + 1]: optimizer step s uses micro-batches step_starts[s]:step_starts[s+1]."""
    step_epochs: np.ndarray
    """int64 [num_steps]: epoch of each optimizer step."""
    meta: dict[str, Any] = field(default_factory=dict)
    """num_samples, gradient_accumulation_steps, seed, shuffle, group_by_length, micro_batches_per_epoch."""

    # --- derived quantities ------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.step_epochs)

    @property
    def global_micro_batch_size(self) -> int:
        return int(self.micro_batches.shape[1])

    @property
    def micro_batches_per_epoch(self) -> int:
        return int(self.meta["micro_batches_per_epoch"])

    @property
    def num_epochs(self) -> int:
        return int(self.step_epochs[-1]) + 1 if self.num_steps else 0

    def step_range(self, step: int) -> range:
        """Micro-batch rows of optimizer step `step` (0-based)."""
        return range(int(self.step_starts[step]), int(self.step_starts[step + 1]))

    def epoch_of(self, step: int) -> int:
        return int(self.step_epochs[step])

    def is_last_step_of_epoch(self, step: int) -> bool:
        return step + 1 == self.num_steps or self.step_epochs[step + 1] != self.step_epochs[step]

    def next_epoch_start(self, step: int) -> int:
        """First step of the epoch after `step`'s (num_steps when there is none)."""
        return int(np.searchsorted(self.step_epochs, self.epoch_of(step) + 1))

    def epoch_progress(self, step: int) -> float:
        """Float epoch after optimizer step `step` (HF's `epoch + micro-batches done / per epoch`)."""
        epoch = self.epoch_of(step)
        done = int(self.step_starts[step + 1]) - epoch * self.micro_batches_per_epoch
        return epoch + done / self.micro_batches_per_epoch

    def shard(self, micro_batch: int, rank: int, world_size: int) -> list[int]:
        """This rank's contiguous chunk of a global micro-batch (padding dropped first, so chunks stay balanced)."""
        row = self.micro_batches[micro_batch]
        row = row[row != PAD]
        return np.array_split(row, world_size)[rank].tolist()

    # --- persistence -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 of the arrays and metadata: two plans with the same fingerprint feed the same samples."""
        digest = hashlib.sha256()
        for array in (self.micro_batches, self.step_starts, self.step_epochs):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
            digest.update(str(array.shape).encode())
        digest.update(json.dumps(self.meta, sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "micro_batches": self.micro_batches,
            "step_starts": self.step_starts,
            "step_epochs": self.step_epochs,
            # metadata as a JSON string inside the npz: loadable with allow_pickle=False
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        # an .npz by hand with fixed zip timestamps (np.savez stamps the current time): the same plan gives
        # the same bytes, so a file hash can serve as a cache key
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BatchPlan:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                micro_batches=data["micro_batches"].astype(np.int64),
                step_starts=data["step_starts"].astype(np.int64),
                step_epochs=data["step_epochs"].astype(np.int64),
                meta=json.loads(str(data["meta"])),
            )


def _epoch_order(
    num_samples: int, epoch: int, seed: int, shuffle: bool, lengths: Sequence[int] | None, group_by_length: bool,
    global_micro_batch_size: int,
) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    # one generator per (seed, epoch): epoch e's order never depends on how many epochs came before
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    order = rng.permutation(num_samples).astype(np.int64)
    if group_by_length:
        if lengths is None:
            raise ValueError("group_by_length=True needs the sample lengths: pass lengths=[...].")
        lengths_arr = np.asarray(lengths)
        size = MEGABATCH_MULT * global_micro_batch_size
        megabatches = [order[i : i + size] for i in range(0, num_samples, size)]
        # longest first inside each megabatch; stable sort keeps the seeded order among equal lengths
        megabatches = [mb[np.argsort(-lengths_arr[mb], kind="stable")] for mb in megabatches]
        order = np.concatenate(megabatches)
    return order


def build_batch_plan(
    num_samples: int,
    global_micro_batch_size: int,
    gradient_accumulation_steps: int,
    num_train_epochs: float,
    max_steps: int,
    seed: int,
    lengths: Sequence[int] | None = None,
    group_by_length: bool = False,
    shuffle: bool = True,
) -> BatchPlan:
    """Plan every global micro-batch of a run (see the module docstring).

    Steps follow transformers.Trainer: an epoch has ceil(micro-batches / accumulation) optimizer steps, its last
    step may hold fewer micro-batches; max_steps > 0 wins, else ceil(num_train_epochs * steps per epoch).
    """
    if num_samples <= 0 or global_micro_batch_size <= 0 or gradient_accumulation_steps <= 0:
        raise ValueError(
            f"build_batch_plan: num_samples={num_samples}, global_micro_batch_size={global_micro_batch_size} and "
            f"gradient_accumulation_steps={gradient_accumulation_steps} must all be > 0."
        )
    micro_per_epoch = math.ceil(num_samples / global_micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / gradient_accumulation_steps)
    num_steps = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
    if num_steps <= 0:
        raise ValueError("build_batch_plan: set max_steps > 0 or num_train_epochs > 0.")
    num_epochs = math.ceil(num_steps / steps_per_epoch)

    rows, step_starts, step_epochs = [], [0], []
    for epoch in range(num_epochs):
        order = _epoch_order(num_samples, epoch, seed, shuffle, lengths, group_by_length, global_micro_batch_size)
        padded = np.full(micro_per_epoch * global_micro_batch_size, PAD, dtype=np.int64)
        padded[:num_samples] = order
        rows.append(padded.reshape(micro_per_epoch, global_micro_batch_size))
        base = epoch * micro_per_epoch
        for start in range(0, micro_per_epoch, gradient_accumulation_steps):
            if len(step_epochs) == num_steps:
                break
            step_starts.append(base + min(start + gradient_accumulation_steps, micro_per_epoch))
            step_epochs.append(epoch)
    micro_batches = np.concatenate(rows)[: step_starts[-1]]
    meta = {
        "num_samples": int(num_samples),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "micro_batches_per_epoch": int(micro_per_epoch),
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "group_by_length": bool(group_by_length),
    }
    return BatchPlan(micro_batches, np.asarray(step_starts, dtype=np.int64), np.asarray(step_epochs, dtype=np.int64), meta)


class PlanBatchSampler:
    """Yields this rank's index lists, micro-batch after micro-batch, from `start_micro_batch` on.

    A rank whose chunk of the last short micro-batch is empty gets the micro-batch's first sample instead (DDP
    needs every rank to run forward/backward); the trainer weighs that stand-in by zero, see `is_empty`.
    """

    def __init__(self, plan: BatchPlan, rank: int, world_size: int, start_micro_batch: int = 0):
        self.plan, self.rank, self.world_size, self.start = plan, rank, world_size, start_micro_batch
        self.yielded: list[tuple[int, list[int]]] = []
        """(micro-batch, this rank's sample indices) handed to the DataLoader since the last `take_yielded`."""

    def is_empty(self, micro_batch: int) -> bool:
        return not self.plan.shard(micro_batch, self.rank, self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for micro_batch in range(self.start, len(self.plan.micro_batches)):
            indices = self.plan.shard(micro_batch, self.rank, self.world_size)
            self.yielded.append((micro_batch, indices))  # a stand-in for an empty chunk is recorded as []
            yield indices or [int(self.plan.micro_batches[micro_batch][0])]

    def __len__(self) -> int:
        return len(self.plan.micro_batches) - self.start

    def take_yielded(self) -> list[tuple[int, list[int]]]:
        """What this rank trained on since the last call (the Trainer passes it to on_step_end)."""
        taken, self.yielded = self.yielded, []
        return taken
