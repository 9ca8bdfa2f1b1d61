"""Reference runs shared by the distributed tests: the same run (37 samples, global micro-batch 8, 6 steps) on
hardware=cpu (1 process, per-device 8) and hardware=ddp_2cpu (2 gloo processes, per-device 4)."""

from __future__ import annotations

import pytest

from tests.distributed.helpers import launch, make_spec


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    # replicas at warning: their INFO lines must not appear (checked in test_equivalence)
    spec1, path1 = make_spec(root, "cpu", 1, log_level_replica="warning")
    spec2, path2 = make_spec(root, "ddp_2cpu", 2, log_level_replica="warning")
    procs = {1: launch(["hardware=cpu"], path1, background=True),
             2: launch(["hardware=ddp_2cpu"], path2, background=True)}
    logs = {}
    for world, proc in procs.items():
        logs[world], _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, logs[world][-4000:]
    return {1: (spec1, logs[1]), 2: (spec2, logs[2])}
