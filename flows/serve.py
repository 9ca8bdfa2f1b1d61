"""Serve the finetune flow as Prefect deployments: a nightly GLUE run on a cron schedule and an unscheduled default.

A team runs one Prefect server and one (or more) serve processes next to it:

    prefect server start --host 127.0.0.1                      # UI and API on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                      # registers the deployments, then runs their flow runs
    python -m flows.serve --root /data/finetune --max-trainings 2 --nightly-cron "30 1 * * *"

    prefect deployment run 'finetune/default' --param 'overrides=["trainer.learning_rate=3e-5"]'
    prefect deployment run 'finetune/nightly-glue'             # now, instead of waiting for the schedule

Deployments (their only parameter is the Hydra override list, so a scheduled run is exactly
`python -m flows.finetune <overrides>`):
  finetune/nightly-glue   cron --nightly-cron (default "0 2 * * *", --timezone UTC), overrides ["task=glue"]
  finetune/default        no schedule, overrides []: trigger it by hand with your overrides
  finetune/sweep          no schedule, sweep overrides (default ["-m", "trainer.learning_rate=1e-5,3e-5,5e-5"]):
                          the run hands them to the finetune-sweep flow (flows/sweep.py), one child run per trial,
                          sweep.max_parallel at a time (each holds a slot of the server's global concurrency limit
                          `finetune-sweep-<sweep name>`, which the sweep creates at sweep.max_parallel slots)

    prefect deployment run 'finetune/sweep' --param 'overrides=["-m","trainer.seed=1,2,3","sweep.max_parallel=2"]'

At most --max-trainings train stages run at once across every flow run of this server: the serve process sets
the tag concurrency limit of the train task's tag `finetune-train` (the same as running
`prefect concurrency-limit create finetune-train 1`). Stop the process with Ctrl-C: the schedules are paused
until it serves again.

The process environment is set up as the CLI sets it (flows/runtime.py) before Prefect is imported: the state
folder is --root (default: paths.root of conf/, `.finetune` under the current directory), and the flow runs it
executes use it as their paths.root unless their overrides set one (FINETUNE_PATHS_ROOT). Run it from the
repository root: deployments point at flows/pipeline.py:finetune.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows import runtime
from stages.health import probe

TRAIN_TAG = "finetune-train"  # stages.train.CONCURRENCY_TAG; not imported here: that would import prefect too early
NIGHTLY_CRON = "0 2 * * *"
DEFAULT_API_URL = "http://127.0.0.1:4200/api"
ROOT_ENV = "FINETUNE_PATHS_ROOT"
SWEEP_OVERRIDES = ("-m", "trainer.learning_rate=1e-5,3e-5,5e-5")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", help="state folder of the flow runs (default: paths.root of conf/, .finetune)")
    parser.add_argument("--api-url", help=f"Prefect API (default: $PREFECT_API_URL, else {DEFAULT_API_URL})")
    parser.add_argument("--max-trainings", type=int, default=1,
                        help=f"tag concurrency limit of {TRAIN_TAG!r}: train stages running at once (default 1)")
    parser.add_argument("--nightly-cron", default=NIGHTLY_CRON, help=f"schedule of finetune/nightly-glue ({NIGHTLY_CRON!r})")
    parser.add_argument("--nightly-overrides", nargs="*", default=["task=glue"],
                        help="Hydra overrides of the nightly run (default: task=glue)")
    parser.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default UTC)")
    parser.add_argument("--max-flow-runs", type=int, default=None, help="flow runs this process executes at once")
    return parser


def _default_root() -> str:
    from flows.config import compose

    return compose([]).paths.root


def deployments(nightly_cron: str = NIGHTLY_CRON, nightly_overrides: list[str] | None = None, timezone: str = "UTC"):
    """The finetune deployments of this repository (imports prefect: call after runtime.configure)."""
    from prefect.schedules import Cron

    from flows.pipeline import finetune

    nightly = finetune.to_deployment(
        name="nightly-glue",
        schedule=Cron(nightly_cron, timezone=timezone),
        parameters={"overrides": list(nightly_overrides if nightly_overrides is not None else ["task=glue"])},
        description="Nightly fine-tune on GLUE; the parameters are Hydra overrides of conf/finetune.yaml.",
        tags=["finetune", "nightly"],
    )
    default = finetune.to_deployment(
        name="default",
        parameters={"overrides": []},
        description="Unscheduled: trigger with --param 'overrides=[...]' (Hydra overrides, as on the CLI).",
        tags=["finetune"],
    )
    sweep = finetune.to_deployment(
        name="sweep",
        parameters={"overrides": list(SWEEP_OVERRIDES)},
        description="Unscheduled: a sweep (flows/sweep.py); the parameters are sweep overrides as on the CLI, "
                    "e.g. -m trainer.learning_rate=1e-5,3e-5 or sweep.search=optuna sweep.n_trials=20 ...",
        tags=["finetune", "sweep"],
    )
    return [nightly, default, sweep]


def set_train_limit(max_trainings: int) -> None:
    """Create or update the tag concurrency limit that caps the train stages running at once."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=TRAIN_TAG, concurrency_limit=max_trainings)  # an upsert on the server


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_trainings < 1:
        print("error: --max-trainings must be at least 1", file=sys.stderr)
        return 2
    api_url = args.api_url or os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL
    problem = probe(api_url)
    if problem:
        print(f"error: the Prefect API at {api_url} does not answer ({problem}). Start a server with "
              "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL (or --api-url).", file=sys.stderr)
        return 1
    os.environ["PREFECT_API_URL"] = api_url
    root = str(Path(args.root or _default_root()).resolve())
    runtime.configure(root)  # before prefect is imported: its home, result storage and telemetry switch
    # the flow runs this process executes compose paths.root from it (conf/paths/default.yaml), unless their
    # overrides name another: stage outputs and the MLflow store land next to Prefect's state, not in the cwd
    os.environ[ROOT_ENV] = root
    runtime.create_state_dirs(root)

    from prefect import serve

    served = deployments(args.nightly_cron, args.nightly_overrides, args.timezone)
    set_train_limit(args.max_trainings)
    print(f"serve: state folder {root}; at most {args.max_trainings} training(s) at once (tag {TRAIN_TAG!r})",
          flush=True)
    serve(*served, limit=args.max_flow_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
