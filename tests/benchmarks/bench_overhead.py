"""The flow's overhead around the trainer, side by side with another checkout (e.g. the previous commit).

    git worktree add --detach /tmp/old HEAD~5 && ln -s "$PWD/.venv" /tmp/old/.venv
    .venv/bin/python tests/benchmarks/bench_overhead.py --old /tmp/old            # the default run, 2 + 3 + 3 runs
    .venv/bin/python tests/benchmarks/bench_overhead.py --cold 1 --cached 1 --server 0 trainer.max_steps=20

Alternating old / new (the VM's speed drifts: never compare runs made minutes apart), each checkout with its own
interpreter (`<checkout>/.venv/bin/python -m flows.finetune`): a first run in a fresh paths.root, identical
re-runs in that root (every stage cached) on the temporary Prefect API, and the same against a running
`prefect server` on 127.0.0.1 (started here). Prints wall time, the training loop (first batch to the last step,
from the log), the overhead (wall - loop) and the time of each phase from the log's timestamps.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.pipeline.helpers import PrefectServer  # noqa: E402 - the repo first on sys.path

PHASES = [  # (name, log line where it starts, log line where it ends; None: the process's start)
    ("start -> API answers", None, "Temporary Prefect API on"),
    ("API answers -> flow begins", "Temporary Prefect API on", "Beginning flow run"),
    ("prepare_data", "prepare_data: cache miss", "rows tokenized into"),
    ("launch -> first batch", "train: /", "first batch sample indices"),
    ("last step -> train stage done", "Training done", "train: finished at step"),
    ("evaluate", "evaluate: cache miss", "evaluate: loss="),
    ("predict", "predict: cache miss", "predict: "),
    ("register", "register: cache miss", "Flow run '"),
    ("train stage: launch -> done", "train: /", "train: finished at step"),
]
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \|")


def _of_day(t: datetime) -> float:
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def _times(log: str, marker: str, after: float = 0.0) -> float | None:
    """Seconds of day of the first line at/after `after` that holds `marker` (Prefect's log timestamps)."""
    for line in log.splitlines():
        if marker in line and (match := STAMP.match(line)):
            seconds = _of_day(datetime.strptime(match.group(1), "%H:%M:%S.%f"))
            if seconds >= after:
                return seconds
    return None


def _phases(log: str, started: float) -> dict[str, float]:
    """Each phase's seconds; `started`: the process's start, in seconds of day."""
    found = {}
    for name, start, end in PHASES:
        a = started if start is None else _times(log, start)
        if a is not None and (b := _times(log, end, after=a + 1e-3)) is not None:
            found[name] = b - a
    return found


def run(checkout: Path, root: Path, overrides: list[str], env: dict[str, str], logs: Path, label: str) -> dict:
    log_path = logs / f"{label}.log"
    of_day = _of_day(datetime.now())
    started = time.perf_counter()
    with open(log_path, "w") as handle:
        code = subprocess.call([str(checkout / ".venv" / "bin" / "python"), "-m", "flows.finetune",
                                f"paths.root={root}", *overrides], cwd=checkout, env=env, stdout=handle,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    log = log_path.read_text()
    loop = None
    if (first := _times(log, "first batch sample indices")) and (done := _times(log, "Training done")):
        loop = done - first
    if code != 0:
        sys.exit(f"{label}: exit code {code}; see {log_path}")
    return {"wall": wall, "loop": loop, "phases": _phases(log, of_day)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="another checkout with its own .venv (e.g. a git worktree)")
    parser.add_argument("--cold", type=int, default=2, help="first runs per checkout (fresh paths.root)")
    parser.add_argument("--cached", type=int, default=3, help="cached re-runs per checkout, temporary API")
    parser.add_argument("--server", type=int, default=3, help="cached re-runs per checkout, running prefect server")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    sides = {"new": REPO, **({"old": args.old.resolve()} if args.old else {})}
    order = ["old", "new"] if args.old else ["new"]
    work = Path(tempfile.mkdtemp(prefix="bench_overhead-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    results: dict[str, dict[str, list]] = {side: {"cold": [], "cached": [], "server": []} for side in order}
    try:
        for i in range(max(args.cold, 1)):
            for side in order:
                root = work / f"{side}-{i}"
                results[side]["cold"].append(run(sides[side], root, args.overrides, env, work, f"{side}-cold-{i}"))
        for i in range(args.cached):
            for side in order:
                results[side]["cached"].append(run(sides[side], work / f"{side}-0", args.overrides, env, work,
                                                   f"{side}-cached-{i}"))
        if args.server:
            (work / "server-home").mkdir()
            with PrefectServer(work / "server-home") as server:
                for i in range(args.server):
                    for side in order:
                        results[side]["server"].append(run(sides[side], work / f"{side}-0", args.overrides,
                                                           {**env, "PREFECT_API_URL": server.url}, work,
                                                           f"{side}-server-{i}"))
    finally:
        print(f"logs: {work}")
    report(results, order, sides)


def _fmt(values: list[float | None]) -> str:
    shown = [f"{v:.1f}" for v in values if v is not None]
    return ", ".join(shown) + (f" (median {statistics.median([v for v in values if v is not None]):.1f})"
                               if len(shown) > 1 else "") if shown else "-"


def report(results: dict, order: list[str], sides: dict[str, Path]) -> None:
    head = " | ".join(f"{side} ({sides[side].name})" for side in order)
    print(f"\n| seconds | {head} |\n|---|" + "---:|" * len(order))
    rows = [
        ("first run: wall", lambda r: [x["wall"] for x in r["cold"]]),
        ("first run: training loop", lambda r: [x["loop"] for x in r["cold"]]),
        ("**first run: overhead (wall - loop)**",
         lambda r: [x["wall"] - x["loop"] if x["loop"] else None for x in r["cold"]]),
        ("first run: wall - train stage (launch -> done)",
         lambda r: [x["wall"] - x["phases"]["train stage: launch -> done"]
                    if "train stage: launch -> done" in x["phases"] else None for x in r["cold"]]),
        ("cached re-run, temporary API", lambda r: [x["wall"] for x in r["cached"]]),
        ("cached re-run, running prefect server", lambda r: [x["wall"] for x in r["server"]]),
    ]
    for name, pick in rows:
        print(f"| {name} | " + " | ".join(_fmt(pick(results[side])) for side in order) + " |")
    for name, _, _ in PHASES:
        print(f"| first run: {name} | " + " | ".join(
            _fmt([x["phases"].get(name) for x in results[side]["cold"]]) for side in order) + " |")


if __name__ == "__main__":
    main()
