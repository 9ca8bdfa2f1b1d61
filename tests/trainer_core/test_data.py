"""The batch plan: shapes, seeding, steps per epoch, shards, O(1) resume, save/load."""

import numpy as np
import pytest

from trainer_core.data import BatchPlan, PlanBatchSampler, build_batch_plan


def test_shape_padding_and_steps():
    # 10 samples, G=4: 3 micro-batches an epoch (last one has 2 real samples); accumulation 2 -> steps of 2 and 1
    plan = build_batch_plan(10, 4, 2, num_train_epochs=2, max_steps=-1, seed=0)
    assert plan.micro_batches.shape == (6, 4)
    assert plan.num_steps == 4
    assert [list(plan.step_range(s)) for s in range(4)] == [[0, 1], [2], [3, 4], [5]]
    assert plan.step_epochs.tolist() == [0, 0, 1, 1]
    for epoch in range(2):
        rows = plan.micro_batches[epoch * 3 : (epoch + 1) * 3].reshape(-1)
        assert sorted(rows[rows >= 0].tolist()) == list(range(10))  # each sample once an epoch
        assert (rows == -1).sum() == 2
    assert plan.epoch_progress(0) == pytest.approx(2 / 3) and plan.epoch_progress(1) == 1.0


def test_seeded_per_epoch_and_max_steps():
    a = build_batch_plan(50, 8, 1, 3, -1, seed=1)
    b = build_batch_plan(50, 8, 1, 3, -1, seed=1)
    c = build_batch_plan(50, 8, 1, 3, -1, seed=2)
    assert np.array_equal(a.micro_batches, b.micro_batches) and a.fingerprint() == b.fingerprint()
    assert not np.array_equal(a.micro_batches, c.micro_batches) and a.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.micro_batches[:7], a.micro_batches[7:14])  # epochs differ
    # max_steps wins and cuts mid-epoch; the epochs it covers are the same as in the longer plan
    short = build_batch_plan(50, 8, 1, 3, 10, seed=1)
    assert short.num_steps == 10 and np.array_equal(short.micro_batches, a.micro_batches[:10])
    # fractional epochs like transformers: ceil(1.5 * 7) steps
    assert build_batch_plan(50, 8, 1, 1.5, -1, seed=1).num_steps == 11


def test_unshuffled_is_sequential():
    plan = build_batch_plan(5, 2, 1, 1, -1, seed=0, shuffle=False)
    assert plan.micro_batches.tolist() == [[0, 1], [2, 3], [4, -1]]


def test_group_by_length_sorts_megabatches_and_stays_seeded():
    lengths = np.random.default_rng(0).integers(1, 100, size=40)
    plan = build_batch_plan(40, 4, 1, 1, -1, seed=3, lengths=lengths, group_by_length=True)
    order = plan.micro_batches.reshape(-1)
    assert sorted(order.tolist()) == list(range(40))
    assert np.all(np.diff(lengths[order]) <= 0)  # one megabatch (50 x 4 > 40): longest first
    other = build_batch_plan(40, 4, 1, 1, -1, seed=4, lengths=lengths, group_by_length=True)
    assert other.fingerprint() != plan.fingerprint()


def test_shards_are_disjoint_contiguous_and_cover():
    plan = build_batch_plan(11, 6, 1, 1, -1, seed=0)  # 2 ranks x 3; last micro-batch has 5 real samples
    for mb in range(len(plan.micro_batches)):
        row = plan.micro_batches[mb]
        shards = [plan.shard(mb, r, 2) for r in range(2)]
        assert shards[0] + shards[1] == row[row >= 0].tolist()
        assert not set(shards[0]) & set(shards[1])
    assert [len(plan.shard(1, r, 2)) for r in range(2)] == [3, 2]


def test_sampler_starts_at_cursor_and_pads_empty_shards():
    plan = build_batch_plan(9, 4, 2, 2, -1, seed=0)  # last micro-batch of an epoch: 1 real sample
    sampler = PlanBatchSampler(plan, rank=0, world_size=1, start_micro_batch=int(plan.step_starts[2]))
    assert list(sampler) == [plan.shard(mb, 0, 1) for mb in range(int(plan.step_starts[2]), len(plan.micro_batches))]
    last = 2  # 1 real sample for 4 ranks: ranks 1..3 get a stand-in that the trainer weighs by 0
    lonely = PlanBatchSampler(plan, rank=3, world_size=4, start_micro_batch=last)
    assert lonely.is_empty(last) and next(iter(lonely)) == [int(plan.micro_batches[last][0])]


def test_save_load_roundtrip(tmp_path):
    plan = build_batch_plan(30, 4, 3, 2, -1, seed=9)
    path = plan.save(tmp_path / "plan.npz")
    loaded = BatchPlan.load(path)
    assert loaded.fingerprint() == plan.fingerprint()
    assert loaded.meta == plan.meta
    with np.load(path, allow_pickle=False) as data:  # no pickle inside
        assert set(data.files) == {"micro_batches", "step_starts", "step_epochs", "meta"}


def test_saved_bytes_are_deterministic(tmp_path):
    import time

    plan = build_batch_plan(30, 4, 3, 2, -1, seed=9)
    first = plan.save(tmp_path / "a.npz").read_bytes()
    time.sleep(2.1)  # zip timestamps have a 2 s resolution
    assert plan.save(tmp_path / "b.npz").read_bytes() == first
