"""Sharded checkpoint files read back on any world size, without a process group (fast, one process).

Shard files are written the way trainer_core.fsdp2.save_sharded writes them (local piece + global shape
and offset in the metadata), here by hand for an uneven 2-way dim-0 split (FSDP2's torch.chunk rule)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import tests.distributed.helpers  # noqa: F401  (puts tests/trainer_core on sys.path)
from trainer_core import fsdp2 as D


def _write_shards(directory, tensors, world):
    for rank in range(world):
        pieces, layout = {}, {}
        for name, value in tensors.items():
            if value.dim() == 0:  # replicated (e.g. a step counter): every rank saves it whole
                pieces[name], layout[name] = value, None
                continue
            chunk = -(-value.shape[0] // world)
            start = min(rank * chunk, value.shape[0])
            pieces[name] = value[start:start + chunk].contiguous()
            layout[name] = {"shape": list(value.shape), "offset": [start] + [0] * (value.dim() - 1)}
        save_file(pieces, str(directory / D.MODEL_SHARD.format(rank=rank)),
                  metadata={"layout": json.dumps(layout), "world_size": str(world), "rank": str(rank)})


def test_consolidate_and_read_any_region(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(7, 3), "b": torch.randn(5), "e": torch.randn(1, 4), "step": torch.tensor(3.0)}
    _write_shards(tmp_path, tensors, world=2)
    full = D.consolidate(tmp_path)
    assert full.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(full[name], value), name
    # what a rank of a 3-process run needs (rows 3:6 of w), taken across both saved shards
    files = D._shard_files(tmp_path, D.MODEL_SHARD)
    assert torch.equal(D._read_region(files, "w", [3, 3], [3, 0], torch.float32), tensors["w"][3:6])
    assert torch.equal(D._read_region(files, "b", [1], [4], torch.float32), tensors["b"][4:5])


def test_a_missing_shard_is_refused(tmp_path):
    _write_shards(tmp_path, {"w": torch.randn(4, 2)}, world=2)
    (tmp_path / D.MODEL_SHARD.format(rank=1)).unlink()
    with pytest.raises(ValueError, match="lacks model_shard_1"):
        D.consolidate(tmp_path)


def test_fsdp_is_done_by_trainer_core_only_where_accelerate_would_not():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    fsdp = {"distributed_type": "FSDP", "fsdp_config": {}}
    cpu2 = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    assert D.needs_manual_fsdp(fsdp, cpu2)
    assert not D.needs_manual_fsdp(fsdp, SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP))
    assert not D.needs_manual_fsdp(fsdp, SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    assert not D.needs_manual_fsdp({"distributed_type": "MULTI_CPU"}, cpu2)
    assert not D.needs_manual_fsdp({}, cpu2)


def test_one_rank_fsdp_round_trip_in_process(tmp_path):
    """FSDP2 on a 1-process gloo group: plain full tensors load into the sharded model (warm start / best-model
    loads), sharded save -> load restores model and optimizer exactly, consolidate gives the full weights."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from stages.launch import free_port
    from tests.trainer_core.factories import tiny_model

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wanted = tiny_model(seed=5).state_dict()
        model = D.shard_model(tiny_model(seed=3), {})
        assert all(isinstance(p, DTensor) for p in model.parameters())
        model.load_state_dict(wanted)
        for name, value in model.state_dict().items():
            assert torch.equal(full(value), wanted[name]), name
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        batch = {"input_ids": torch.randint(5, 100, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
        model(**batch).loss.backward()
        optimizer.step()
        D.save_sharded(model, optimizer, tmp_path)

        other = D.shard_model(tiny_model(seed=7), {})
        other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
        D.load_sharded(other, other_opt, tmp_path)
        for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(full(a), full(b)), name
        for a, b in zip(optimizer.state.values(), other_opt.state.values(), strict=True):
            for key in a:
                assert torch.equal(full(a[key]), full(b[key])), key
        consolidated = D.consolidate(tmp_path)
        for name, value in model.state_dict().items():
            assert torch.equal(consolidated[name], full(value)), name
    finally:
        dist.destroy_process_group()
