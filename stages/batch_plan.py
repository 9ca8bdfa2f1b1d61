"""Stage 2: the batch plan every rank builds its DataLoader from → BatchPlanRef.

The plan fixes, for every optimizer step, which samples form each global micro-batch
(`trainer.train_sampling_strategy`: seeded shuffling, optionally grouped by length, or the dataset's order).
Ranks take their shard of each micro-batch inside trainer_core, and a resume jumps straight to the plan's row
for its step. It depends on the batch geometry and seed only: changing the
learning rate reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from stages.caching import begin_stage, cache_key_fn, single_writer, stage_logger
from stages.refs import BatchPlanRef, DatasetRef, file_sha256
from stages.schema import HardwareConfig, PathsConfig
from trainer_core.args import TrainingArguments
from trainer_core.data import build_batch_plan

NAME = "batch_plan"
CODE = ("stages.batch_plan", "trainer_core.data")


@dataclass(frozen=True)
class BatchGeometry:
    """The trainer keys that shape the plan (and nothing else, so the cache key ignores the rest)."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: float
    max_steps: int
    seed: int
    train_sampling_strategy: str
    """random, sequential or group_by_length (trainer_core.args.SAMPLING_STRATEGIES)."""
    world_size: int

    @classmethod
    def of(cls, trainer: TrainingArguments, hardware: HardwareConfig) -> BatchGeometry:
        return cls(
            per_device_train_batch_size=trainer.per_device_train_batch_size,
            gradient_accumulation_steps=trainer.gradient_accumulation_steps,
            num_train_epochs=trainer.num_train_epochs,
            max_steps=trainer.max_steps,
            seed=trainer.seed,
            train_sampling_strategy=trainer.train_sampling_strategy,
            world_size=hardware.num_processes,
        )

    @property
    def global_micro_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size

    @property
    def shuffle(self) -> bool:
        return self.train_sampling_strategy != "sequential"

    @property
    def group_by_length(self) -> bool:
        return self.train_sampling_strategy == "group_by_length"


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
@single_writer(NAME, CODE)
def batch_plan(data: DatasetRef, geometry: BatchGeometry, paths: PathsConfig) -> BatchPlanRef:
    """Write the seeded batch plan for the train split of `data`."""
    import datasets

    out = begin_stage(NAME, {"data": data, "geometry": geometry, "paths": paths}, CODE)
    train = datasets.load_from_disk(data.dataset_dir)["train"]
    lengths = data.family().lengths(train) if geometry.group_by_length else None
    plan = build_batch_plan(
        num_samples=len(train),
        global_micro_batch_size=geometry.global_micro_batch_size,
        gradient_accumulation_steps=geometry.gradient_accumulation_steps,
        num_train_epochs=geometry.num_train_epochs,
        max_steps=geometry.max_steps,
        seed=geometry.seed,
        lengths=lengths,
        group_by_length=geometry.group_by_length,
        shuffle=geometry.shuffle,
    )
    path = plan.save(out / "plan.npz")
    ref = BatchPlanRef(
        path=str(path),
        fingerprint=file_sha256(path),
        world_size=geometry.world_size,
        global_micro_batch_size=geometry.global_micro_batch_size,
        num_optimizer_steps=plan.num_steps,
        num_epochs=plan.num_epochs,
    )
    ref.save(out / "ref.json")
    stage_logger().info(
        "batch_plan: %d optimizer steps over %d epoch(s), global micro-batch %d",
        plan.num_steps, plan.num_epochs, geometry.global_micro_batch_size,
    )
    return ref
