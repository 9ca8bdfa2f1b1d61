"""hardware=ddp_2cpu ≡ hardware=cpu with the same global batch, and two "machines" on one host ≡ one process.

Tolerance: atol 1e-5 on every logged value (train loss, grad norm, eval metrics), atol 5e-5 on every final
weight. The runs see the same global micro-batches and the loss is normalised by the items of the whole window
on all ranks, so they compute the same gradient; only the float32 summation order differs (each rank sums its
half, the gloo all-reduce / reduce-scatter adds the halves). Measured over the 6 steps: losses differ by ~1e-7,
weights by up to ~3e-6 (AdamW's normalised update m/sqrt(v) magnifies rounding in near-zero gradients). The
bounds leave >10x headroom and stay far below a real divergence (a wrong loss scale or a duplicated sample moves
the loss by >1e-3).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.launch import free_port
from tests.distributed.helpers import launch, make_spec, metrics, read_records

pytestmark = pytest.mark.integration
ATOL = 1e-5
WEIGHT_ATOL = 5e-5


def assert_same_run(got_spec, ref_spec, steps=None):
    got, ref = metrics(got_spec), metrics(ref_spec)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 3, 4, 5, 6, 6]
    for a, b in zip(got, ref, strict=True):
        if steps is not None and b["step"] not in steps:
            continue
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in b["metrics"].items():
            assert a["metrics"][key] == pytest.approx(value, abs=ATOL), (b["step"], key)
    w_got = load_file(str(Path(got_spec.output_dir) / "final" / "model.safetensors"))
    w_ref = load_file(str(Path(ref_spec.output_dir) / "final" / "model.safetensors"))
    assert w_got.keys() == w_ref.keys()
    for name, value in w_ref.items():
        torch.testing.assert_close(w_got[name], value, atol=WEIGHT_ATOL, rtol=0, msg=name)


def per_micro_batch(records):
    """{micro-batch row: {rank: sample indices}} over the step records."""
    out: dict[int, dict[int, list[int]]] = {}
    for r in records:
        if r["event"] == "step":
            for mb, indices in r["micro_batches"]:
                out.setdefault(mb, {})[r["rank"]] = indices
    return out


def test_ddp_2cpu_matches_cpu_with_the_same_global_batch(reference_runs):
    (spec1, log1), (spec2, log2) = reference_runs[1], reference_runs[2]
    assert "rank 0/1: world_size=1 per_device_train_batch_size=8" in log1
    assert "[rank 0] INFO trainer_core: rank 0/2: world_size=2 per_device_train_batch_size=4" in log2
    assert_same_run(spec2, spec1)

    # the 2 ranks split every global micro-batch of the 1-process run, disjointly and completely
    one = per_micro_batch(read_records(Path(spec1.output_dir).parent / "samples-ws1"))
    two = per_micro_batch(read_records(Path(spec2.output_dir).parent / "samples-ws2"))
    assert sorted(one) == sorted(two) == list(range(10))
    for mb, ranks in two.items():
        assert not set(ranks[0]) & set(ranks[1])
        assert ranks[0] + ranks[1] == one[mb][0]

    # per rank: replicas log at log_level_replica=warning (no INFO line of rank 1), only rank 0 writes the
    # shared files (one metrics line per step and event, one model/optimizer file), every rank its RNG
    assert "[rank 0] INFO" in log2 and "[rank 1] INFO" not in log2
    step3 = Path(spec2.output_dir) / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in step3.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng_state_0.json", "rng_state_1.json",
        "scheduler.pt", "trainer_state.json"]


def test_two_machines_on_one_host_match_one_process(reference_runs, tmp_path):
    spec, path = make_spec(tmp_path, "multinode", 2)
    port = str(free_port())
    procs = []
    for machine_rank in (0, 1):  # two separate launches, as on two nodes; static rendezvous on 127.0.0.1
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NUM_MACHINES": "2", "GPUS_PER_MACHINE": "1",
               "MACHINE_RANK": str(machine_rank)}
        procs.append(launch(["hardware=multinode", "hardware.use_cpu=true"], path, env=env, background=True,
                            tag=f"-machine{machine_rank}"))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    for machine_rank in (0, 1):
        cfg = yaml.safe_load((path.parent / f"accelerate-machine{machine_rank}.yaml").read_text())
        assert (cfg["num_machines"], cfg["num_processes"], cfg["machine_rank"]) == (2, 2, machine_rank)
        assert (cfg["main_process_ip"], cfg["main_process_port"]) == ("127.0.0.1", int(port))
        # one process per "machine", each the global rank of its machine
        assert re.search(rf"\[rank {machine_rank}\] INFO trainer_core: rank {machine_rank}/2: world_size=2",
                         logs[machine_rank]), logs[machine_rank][-3000:]
    assert json.loads((Path(spec.output_dir) / "final" / "train_result.json").read_text())["global_step"] == 6
    assert_same_run(spec, reference_runs[1][0])
