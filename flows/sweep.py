"""Sweeps: a grid or an Optuna search over Hydra overrides, as one Prefect flow and one MLflow parent run.

    python -m flows.finetune -m trainer.learning_rate=1e-5,3e-5,5e-5 trainer.seed=1,2          # a 3 x 2 grid
    python -m flows.finetune -m model=tiny_bert 'trainer.seed=range(1,4)' sweep.max_parallel=2
    python -m flows.finetune sweep.search=optuna sweep.n_trials=20 'trainer.learning_rate=interval(1e-5,1e-3)'
    python -m flows.finetune sweep.search=optuna 'trainer.learning_rate=tag(log,interval(1e-5,1e-3))' \\
        trainer.eval_strategy=steps trainer.eval_steps=20 sweep.pruner=median

Sweep overrides use Hydra's grammar (parsed by Hydra's OverridesParser): `a,b,c` and `choice(a,b)` and
`range(start,stop[,step])` for a grid or a search, `interval(low,high)` (with `tag(log, ...)` for a log scale,
`tag(int, ...)` for integers) for a search only. Every trial is a run of the `finetune` flow as a child flow run
of the `finetune-sweep` flow; the stages that do not read a swept key are served from the cache after the first
trial (tokenization runs once). Each trial's MLflow run nests under the sweep's run (`mlflow.parentRunId`).

The objective is the registry's metric (validation_<registry.champion_metric>), in its direction
(registry.higher_is_better()). Optuna asks and is told from this flow; its study lives in
<paths.root>/sweeps/optuna.journal, so a sweep stopped halfway resumes where it stopped when run again (trials
it finished are kept, the one it was running starts over). One sweep process per study at a time.

Pruning (sweep.pruner, Optuna only) reads the trials' evaluations while they train (trainer.eval_strategy must
evaluate during training) and stops a weak trial's ranks through flows/pruning.py; a pruned trial is not
registered. Only the best completed trial is registered (sweep.register=all: every completed one, best first;
none: none), through the same champion gate as a single run.

Trials run sweep.max_parallel at a time (threads of this flow, each trial a child flow run), and each holds a
slot of the Prefect global concurrency limit `finetune-sweep-<name>` (limit = sweep.max_parallel, created at the
sweep's start on the configured API: a `prefect server`, or the ephemeral one under paths.root) while it runs; lower
it from the UI or with `prefect gcl update finetune-sweep-<name> --limit 1` and the next trials wait for a slot.
The train stages of every flow run on the server are capped too, by the `finetune-train` tag limit (flows/serve.py).

Exit codes: 0 every trial completed or was pruned; 3 the sweep completed but at least one trial failed (the
others' results, the best trial and its registration stand); 2 bad input (before any trial starts); 1 the sweep
itself failed. The report is printed and written to <paths.root>/sweeps/<name>/report.json.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import math
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.config import compose
from stages.schema import ConfigError, FinetuneConfig, stable_hash
from trainer_core.files import write_json_atomic

MULTIRUN_FLAGS = ("-m", "--multirun")
COMPLETED_WITH_FAILURES = 3
"""Exit code of a sweep that ran to its end with at least one failed trial."""
STUDY_STORAGE = "optuna.journal"
TRIAL_LIMIT_PREFIX = "finetune-sweep-"


# --- the search space ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchParam:
    """One swept key: a list of choices (grid or search) or a numeric range (search only)."""

    key: str
    """The override's key as written (`trainer.learning_rate`, `model`, `+trainer.foo`)."""
    choices: tuple[str, ...] = ()
    """Values in the override grammar, for a list / choice() / range() (a grid's axis)."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_discrete(self) -> bool:
        return bool(self.choices)

    def describe(self) -> str:
        if self.is_discrete:
            return ",".join(self.choices)
        scale = "log " if self.log else ""
        return f"{scale}{'int ' if self.integer else ''}interval({self.low:g}, {self.high:g})"


def _param_of(override: Any, search: str) -> SearchParam:
    """A Hydra sweep override as a SearchParam; ConfigError for one with no values or the wrong search."""
    from hydra.core.override_parser.types import IntervalSweep

    key = override.get_key_element()
    value = override.value()
    if isinstance(value, IntervalSweep):
        if search != "optuna":
            raise ConfigError(f"{override.input_line}: interval() is a continuous range, which a grid cannot list; "
                              "use sweep.search=optuna, or a list / range() for a grid.")
        low, high = float(value.start), float(value.end)
        if not low < high:
            raise ConfigError(f"{override.input_line}: the search space has no values (interval needs low < high).")
        if "log" in value.tags and low <= 0:
            raise ConfigError(f"{override.input_line}: a log scale needs low > 0.")
        return SearchParam(key=key, low=low, high=high, log="log" in value.tags, integer="int" in value.tags)
    choices = tuple(override.sweep_string_iterator())
    if not choices:
        raise ConfigError(f"{override.input_line}: the search space has no values; give at least one value.")
    return SearchParam(key=key, choices=choices)


@dataclass
class SweepPlan:
    """A sweep before it runs: the fixed overrides, the swept keys and the objective. Pure: no Prefect here."""

    overrides: list[str]
    """The overrides as given (sweep ones included): the flow's parameter, so a deployment run is the CLI run."""
    fixed: list[str]
    """The overrides every trial gets (no sweep.* keys: those configure the sweep, not a trial)."""
    params: list[SearchParam]
    base: FinetuneConfig
    name: str

    @property
    def search(self) -> str:
        return self.base.sweep.search

    @property
    def metric(self) -> str:
        """The objective: the trials' final validation metric the champion gate compares."""
        return f"validation_{self.base.registry.champion_metric.removeprefix('eval_')}"

    @property
    def eval_metric(self) -> str:
        """The same metric in the trainer's evaluations during training (pruning reads these)."""
        return f"eval_{self.base.registry.champion_metric.removeprefix('eval_')}"

    @property
    def higher_is_better(self) -> bool:
        return self.base.registry.higher_is_better()

    @property
    def folder(self) -> Path:
        return Path(self.base.paths.root) / "sweeps" / self.name

    @property
    def prunes(self) -> bool:
        return self.search == "optuna" and self.base.sweep.pruner != "none"

    def space(self) -> dict[str, str]:
        return {p.key: p.describe() for p in self.params}

    def grid(self) -> list[list[str]]:
        """Every combination of the swept values, as the trials' own overrides (last key varies fastest)."""
        axes = [[f"{p.key}={v}" for v in p.choices] for p in self.params]
        return [list(combo) for combo in itertools.product(*axes)]

    def trial_overrides(self, own: list[str]) -> list[str]:
        return [*self.fixed, *own]

    @property
    def trial_limit(self) -> str:
        """The Prefect global concurrency limit a trial holds a slot of while it runs."""
        return f"{TRIAL_LIMIT_PREFIX}{self.name}"


def is_sweep(argv: list[str]) -> bool:
    """`-m` / `--multirun` anywhere, or sweep.search other than grid: flows.finetune hands these to this module."""
    return any(a in MULTIRUN_FLAGS for a in argv) or any(
        a.split("=", 1)[0].lstrip("+") == "sweep.search" and a.split("=", 1)[1] != "grid" for a in argv if "=" in a)


def plan_sweep(argv: list[str]) -> SweepPlan:
    """Parse and check a sweep before anything runs: every problem is one ConfigError (the CLI's exit code 2)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"Invalid sweep override: {exc}") from None
    swept = [o for o in parsed if o.is_sweep_override()]
    if bad := [o.input_line for o in swept if o.key_or_group.startswith("sweep.")]:
        raise ConfigError(f"{', '.join(bad)}: the sweep.* keys configure the sweep itself and cannot be swept.")
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(fixed)
    search = base.sweep.search
    if not swept:
        raise ConfigError(
            "The search space is empty: sweep at least one key, e.g. trainer.learning_rate=1e-5,3e-5 (a grid, with -m) "
            "or 'trainer.learning_rate=interval(1e-5,1e-3)' (sweep.search=optuna).")
    params = [_param_of(o, search) for o in swept]
    trial_fixed = [o for o in fixed if not o.lstrip("+~").startswith("sweep.")]
    identity = {"fixed": sorted(trial_fixed), "params": [asdict(p) for p in params], "search": search}
    if search == "optuna":
        identity.update(sampler=base.sweep.sampler, seed=base.sweep.seed, pruner=base.sweep.pruner)
    name = base.sweep.study_name or f"{search}-{stable_hash(identity)[:12]}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"sweep.study_name={name!r}: use letters, digits, '.', '_' and '-' only (it names the "
                          "sweep's folder and its Prefect concurrency limit), e.g. sweep.study_name=lr-search-1.")
    plan = SweepPlan(overrides=overrides, fixed=trial_fixed, params=params, base=base, name=name)
    for own in _probes(plan):  # unknown keys, wrong types and cross-field problems, before any trial starts
        try:
            compose(plan.trial_overrides(own))
        except ConfigError as exc:
            raise ConfigError(f"sweep trial {' '.join(own)}: {exc}") from None
    return plan


def _probes(plan: SweepPlan) -> list[list[str]]:
    """The trials to compose up front: the whole grid, or a search space's every choice and both ends."""
    if plan.search == "grid":
        return plan.grid()
    values = [list(p.choices) if p.is_discrete else [_render_number(p, p.low), _render_number(p, p.high)]
              for p in plan.params]
    probes = []
    for i, param in enumerate(plan.params):
        for value in values[i]:
            probes.append([f"{q.key}={value if q is param else values[j][0]}" for j, q in enumerate(plan.params)])
    return probes


def _render_number(param: SearchParam, value: float) -> str:
    return str(int(round(value))) if param.integer else repr(float(value))


# --- trials ------------------------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    own: list[str]
    """This trial's values of the swept keys, as overrides."""
    params: dict[str, str]
    state: str = "PENDING"
    """COMPLETE, PRUNED or FAILED once run."""
    value: float | None = None
    global_step: int | None = None
    """Optimizer steps the trial trained (fewer than trainer.max_steps once pruned)."""
    mlflow_run_id: str | None = None
    stages: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "report"}


def _hydra_literal(value: Any) -> str:
    """A value in Hydra's override grammar (the trainer.callbacks list a pruned trial needs)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_literal(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _run_trial(plan: SweepPlan, trial: Trial, parent_run_id: str, extra: list[str] = ()) -> Trial:
    """One child flow run of `finetune`; a failure is recorded on the trial, never raised."""
    from prefect.concurrency.sync import concurrency

    from flows.pipeline import finetune
    from stages.tracking import client

    child = finetune.with_options(flow_run_name=f"{plan.name}-trial-{trial.number:03d}")
    # strict: a missing limit is an error, not a silent free-for-all; a lease renewal hiccup must not kill a trial
    with concurrency(plan.trial_limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        started = time.monotonic()
        state = child(overrides=plan.trial_overrides([*trial.own, *extra]), parent_run_id=parent_run_id,
                      register_model=False, return_state=True)
    trial.seconds = round(time.monotonic() - started, 1)
    mlflow_client = client(_tracking_uri(plan))
    try:
        report = state.result()
    except BaseException as exc:  # noqa: BLE001 - the trial failed; the sweep goes on
        trial.state, trial.error = "FAILED", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        trial.mlflow_run_id = _run_of_flow_run(mlflow_client, str(state.state_details.flow_run_id))
        return trial
    trial.report, trial.mlflow_run_id, trial.stages = report, report["mlflow_run_id"], report["stages"]
    trial.global_step = report["global_step"]
    value = report["metrics"].get(plan.metric)
    if value is None or not math.isfinite(value):
        trial.state, trial.error = "FAILED", f"{plan.metric}={value}: the objective is missing or not finite"
    else:
        trial.state, trial.value = "COMPLETE", float(value)
    return trial


def set_trial_limit(plan: SweepPlan) -> None:
    """Create the sweep's global concurrency limit afresh, at sweep.max_parallel slots. Afresh: one sweep process
    runs a study at a time, so slots still held are a killed run's (their leases would block a resume for minutes)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(plan.trial_limit)
        except ObjectNotFound:
            pass
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=plan.trial_limit, limit=plan.base.sweep.max_parallel))


def _tracking_uri(plan: SweepPlan) -> str:
    from stages.tracking import tracking_uri

    return tracking_uri(plan.base)


def _run_of_flow_run(mlflow_client, flow_run_id: str) -> str | None:
    from stages.tracking import FLOW_RUN_TAG

    runs = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _tag_trial(plan: SweepPlan, trial: Trial) -> None:
    from stages.tracking import client

    if trial.mlflow_run_id:
        mlflow_client = client(_tracking_uri(plan))
        for key, value in (("sweep.name", plan.name), ("sweep.trial", str(trial.number)), ("sweep.state", trial.state)):
            mlflow_client.set_tag(trial.mlflow_run_id, key, value)


class _Pool:
    """Runs trials max_parallel at a time in threads, each in a copy of the flow's context (so each child flow
    run nests under this flow run)."""

    def __init__(self, max_parallel: int):
        self.executor = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="trial")
        self.max_parallel = max_parallel
        self.running: set[Future] = set()

    def submit(self, fn, *args: Any) -> None:
        context = contextvars.copy_context()
        self.running.add(self.executor.submit(context.run, fn, *args))

    def wait(self, for_all: bool = False) -> list[Any]:
        """Results of the trials that finished; waits while the pool is full (or, with for_all, until empty)."""
        done: list[Any] = []
        while self.running and (for_all or len(self.running) >= self.max_parallel):
            finished, self.running = wait(self.running, return_when=FIRST_COMPLETED)
            done += [f.result() for f in finished]
        return done

    def close(self) -> list[Any]:
        done = self.wait(for_all=True)
        self.executor.shutdown()
        return done


def run_grid(plan: SweepPlan, parent_run_id: str, logger) -> list[Trial]:
    trials = [Trial(number=i, own=own, params=dict(o.split("=", 1) for o in own))
              for i, own in enumerate(plan.grid())]
    pool = _Pool(plan.base.sweep.max_parallel)
    for trial in trials:
        logger.info("sweep %s: trial %d (%d of %d): %s", plan.name, trial.number, trial.number + 1, len(trials),
                    " ".join(trial.own))
        pool.submit(_finish_grid_trial, plan, trial, parent_run_id, logger)
        if trial.number == 0:
            pool.wait(for_all=True)  # the first alone: it fills the cache of the stages the others share
        pool.wait()
    pool.close()
    return trials


def _finish_grid_trial(plan: SweepPlan, trial: Trial, parent_run_id: str, logger) -> Trial:
    _run_trial(plan, trial, parent_run_id)
    _tag_trial(plan, trial)
    logger.info("sweep %s: trial %d %s (%s=%s)%s", plan.name, trial.number, trial.state, plan.metric, trial.value,
                f": {trial.error}" if trial.error else "")
    return trial


# --- Optuna ------------------------------------------------------------------------------------------


def _distributions(plan: SweepPlan) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in plan.params:
        if p.is_discrete:
            out[p.key] = CategoricalDistribution(list(p.choices))
        elif p.integer:
            out[p.key] = IntDistribution(int(math.ceil(p.low)), int(math.floor(p.high)), log=p.log)
        else:
            out[p.key] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def open_study(plan: SweepPlan):
    """The sweep's study in <paths.root>/sweeps/optuna.journal: created, or loaded to resume."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    cfg = plan.base.sweep
    path = Path(plan.base.paths.root) / "sweeps" / STUDY_STORAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    direction = "maximize" if plan.higher_is_better else "minimize"
    known = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    # seeded past the trials already asked: a resumed sampler must not propose the first trials again
    seed = cfg.seed + (known[plan.name].n_trials if plan.name in known else 0)
    sampler = optuna.samplers.TPESampler(seed=seed) if cfg.sampler == "tpe" else optuna.samplers.RandomSampler(seed)
    if cfg.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                             n_warmup_steps=cfg.pruner_warmup_steps)
    elif cfg.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.pruner_warmup_steps),
                                                max_resource=max(plan.base.trainer.max_steps, 1))
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=plan.name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if plan.name in known and known[plan.name].direction.name != direction.upper():
        raise ConfigError(f"sweep.study_name={plan.name}: the study in {path} {known[plan.name].direction.name.lower()}s, "
                          f"this sweep would {direction} {plan.metric}; use another sweep.study_name.")
    return study


def _resume(study, logger) -> int:
    """Close the trials a killed sweep left running (failed, their values queued to run again); returns how many
    trials already count towards sweep.n_trials."""
    from optuna.trial import TrialState

    waiting = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
        if stale.params not in waiting:
            study.enqueue_trial(stale.params)
        logger.info("sweep %s: trial %d was interrupted; its values run again", study.study_name, stale.number)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return sum(1 for t in done if t.state != TrialState.FAIL or "error" in t.user_attrs)


def run_optuna(plan: SweepPlan, parent_run_id: str, logger) -> list[Trial]:
    """Ask-and-tell: trials asked here, run as child flows, told COMPLETE / PRUNED / FAIL."""
    study = open_study(plan)
    finished = _resume(study, logger)
    remaining = max(plan.base.sweep.n_trials - finished, 0)
    if finished:
        logger.info("sweep %s: resuming, %d of %d trials already finished", plan.name, finished,
                    plan.base.sweep.n_trials)
    if plan.prunes and plan.base.trainer.eval_strategy == "no":
        logger.warning("sweep %s: sweep.pruner=%s, but trials evaluate only at the end (trainer.eval_strategy=no): "
                       "none can be pruned. Set trainer.eval_strategy=steps to prune.", plan.name, plan.base.sweep.pruner)
    distributions = _distributions(plan)
    pool = _Pool(plan.base.sweep.max_parallel)
    ran: dict[int, Trial] = {}
    for i in range(remaining):
        asked = study.ask(distributions)
        own = [f"{p.key}={_optuna_value(p, asked.params[p.key])}" for p in plan.params]
        trial = ran[asked.number] = Trial(number=asked.number, own=own, params=dict(o.split("=", 1) for o in own))
        logger.info("sweep %s: trial %d (%d of %d left): %s", plan.name, trial.number, remaining - i, remaining,
                    " ".join(own))
        pool.submit(_run_optuna_trial, plan, study, asked, trial, parent_run_id, logger)
        if i == 0 and not finished:
            pool.wait(for_all=True)  # the first alone: it fills the cache of the stages the others share
        pool.wait()
    pool.close()
    return [ran.get(t.number, t) for t in _study_trials(plan, study)]  # earlier sweeps' trials: from the study


def _optuna_value(param: SearchParam, value: Any) -> str:
    if param.is_discrete:
        return str(value)
    return _render_number(param, value)


def _run_optuna_trial(plan: SweepPlan, study, asked, trial: Trial, parent_run_id: str, logger) -> Trial:
    from optuna.trial import TrialState

    extra: list[str] = []
    watcher = None
    if plan.prunes and plan.base.trainer.eval_strategy != "no":
        control = plan.folder / f"trial-{trial.number:04d}"
        callbacks = [*plan.base.trainer.callbacks,
                     {"_target_": "flows.pruning.PruneOnRequest", "control_dir": str(control)}]
        extra = [f"trainer.callbacks={_hydra_literal(callbacks)}"]
        watcher = _PruneWatcher(asked, control, plan.eval_metric)
        watcher.start()
    try:
        _run_trial(plan, trial, parent_run_id, extra)
    finally:
        pruned = watcher.stop() if watcher else False
    if trial.state == "COMPLETE" and pruned:
        trial.state = "PRUNED"
    # MLflow and the study's records first, the tell last: once told, a killed sweep's resume counts the trial
    _tag_trial(plan, trial)
    for key, value in (("mlflow_run_id", trial.mlflow_run_id), ("global_step", trial.global_step)):
        asked.set_user_attr(key, value)
    if trial.state == "PRUNED":
        study.tell(asked, state=TrialState.PRUNED)
    elif trial.state == "COMPLETE":
        asked.set_user_attr("refs", trial.report["refs"])  # what registering it takes, should a resumed sweep pick it
        study.tell(asked, trial.value)
    else:
        asked.set_user_attr("error", trial.error or "failed")
        study.tell(asked, state=TrialState.FAIL)
    logger.info("sweep %s: trial %d %s (%s=%s)%s", plan.name, trial.number, trial.state, plan.metric, trial.value,
                f": {trial.error}" if trial.error else "")
    return trial


class _PruneWatcher:
    """Reports a running trial's evaluations to Optuna as they appear; asks its ranks to stop once it should
    be pruned (flows/pruning.py reads the request)."""

    POLL_SECONDS = 0.1
    """The trial's main process waits for each verdict (flows/pruning.py): this is what an evaluation costs it."""

    def __init__(self, asked, control_dir: Path, eval_metric: str):
        from flows.pruning import EVALUATIONS, JUDGED, PRUNE

        self.asked, self.eval_metric = asked, eval_metric
        self.evaluations, self.request = control_dir / EVALUATIONS, control_dir / PRUNE
        self.judged = control_dir / JUDGED
        control_dir.mkdir(parents=True, exist_ok=True)
        for leftover in (self.request, self.evaluations, self.judged):  # a trial number is used once
            leftover.unlink(missing_ok=True)
        self._lines_read = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="prune-watcher")
        self.pruned = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> bool:
        """After the trial's flow returned: report what is left; True if the trial was pruned."""
        self._done.set()
        self._thread.join()
        self._poll()
        return self.pruned

    def _loop(self) -> None:
        while not self._done.wait(self.POLL_SECONDS):
            self._poll()

    def _poll(self) -> None:
        if self.pruned:
            return
        try:
            lines = self.evaluations.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines[self._lines_read:]:
            try:
                record = json.loads(line)
            except ValueError:
                break  # being written: read it next time
            self._lines_read += 1
            value = record["metrics"].get(self.eval_metric)
            if value is not None:
                self.asked.report(float(value), int(record["step"]))
                if self.asked.should_prune():
                    self.pruned = True
                    self.request.write_text(f"pruned at step {record['step']} ({self.eval_metric}={value})\n")
                    return
            write_json_atomic(self.judged, int(record["step"]))  # the ranks wait for this (or the request)


def _study_trials(plan: SweepPlan, study) -> list[Trial]:
    """Every trial of the study (a resumed sweep's earlier ones too), as Trials with their MLflow runs."""
    from optuna.trial import TrialState

    from stages.tracking import client

    mlflow_client = client(_tracking_uri(plan))
    runs = {}
    for run in mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()],
                                         filter_string=f"tags.`sweep.name` = '{plan.name}'"):
        runs.setdefault(run.data.tags.get("sweep.trial"), run)  # newest first: the trial's last run
    names = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAILED"}
    trials = []
    for t in study.get_trials(deepcopy=False, states=tuple(names)):
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            continue  # interrupted by a kill: its values ran again as another trial
        own = [f"{p.key}={_optuna_value(p, t.params[p.key])}" for p in plan.params if p.key in t.params]
        run = runs.get(str(t.number))
        trials.append(Trial(number=t.number, own=own, params=dict(o.split("=", 1) for o in own), state=names[t.state],
                            value=t.value if t.state == TrialState.COMPLETE else None,
                            global_step=t.user_attrs.get("global_step"),
                            mlflow_run_id=t.user_attrs.get("mlflow_run_id") or (run.info.run_id if run else None),
                            error=t.user_attrs.get("error"), report={"refs": t.user_attrs.get("refs")}))
    return trials


# --- the flow ----------------------------------------------------------------------------------------


def best_trial(trials: list[Trial], higher_is_better: bool) -> Trial | None:
    """The completed trial with the best objective; ties go to the first."""
    sign = 1.0 if higher_is_better else -1.0
    completed = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    return max(completed, key=lambda t: (sign * t.value, -t.number)) if completed else None


def ranked(trials: list[Trial], higher_is_better: bool) -> list[Trial]:
    """Completed trials best first, then the pruned, then the failed."""
    sign = -1.0 if higher_is_better else 1.0
    order = {"COMPLETE": 0, "PRUNED": 1, "FAILED": 2}
    return sorted(trials, key=lambda t: (order.get(t.state, 3), sign * (t.value or 0.0), t.number))


def _register(plan: SweepPlan, trials: list[Trial], logger) -> list[dict[str, Any]]:
    """The best trial (or every completed one, best first) through the register stage and its champion gate."""
    from flows import runtime
    from stages import lineage
    from stages.refs import DatasetRef, MetricsRef, ModelRef
    from stages.register import register
    from stages.tracking import RunInfo, tracking_uri

    mode = plan.base.sweep.register
    chosen = [t for t in ranked(trials, plan.higher_is_better) if t.state == "COMPLETE" and t.report.get("refs")]
    if mode == "best":
        chosen = chosen[:1]
    elif mode == "none":
        chosen = []
    registered = []
    for trial in chosen:
        refs = trial.report["refs"]
        overrides = plan.trial_overrides(trial.own)
        cfg = compose(overrides)
        run = RunInfo(**refs["run"])
        stage = register.with_options(result_storage=runtime.result_storage(cfg.paths.root, cfg.paths.results))
        version = stage(ModelRef(**refs["model"]), MetricsRef(**refs["metrics"]), DatasetRef(**refs["data"]),
                        cfg.task, cfg.registry, tracking_uri(cfg), cfg.paths, run)
        lineage.record(run, version, cfg, overrides)  # the trial's own overrides: reproduce= re-runs just it
        logger.info("sweep %s: trial %d registered as %s v%s (aliases: %s)", plan.name, trial.number, version.name,
                    version.version, ", ".join(version.aliases) or "none")
        registered.append({"trial": trial.number, "model_name": version.name, "model_version": version.version,
                           "aliases": version.aliases})
    return registered


def _markdown(plan: SweepPlan, report: dict[str, Any]) -> str:
    keys = [p.key for p in plan.params]
    head = f"| rank | trial | {' | '.join(keys)} | state | {plan.metric} | MLflow run |"
    rows = [head, "|" + "---|" * (len(keys) + 5)]
    for rank, t in enumerate(report["trials"], start=1):
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        state = t["state"] + (f" ({t['error'][:80]})" if t["error"] else "")
        rows.append(f"| {rank} | {t['number']} | {' | '.join(t['params'].get(k, '') for k in keys)} | {state} | "
                    f"{value} | `{t['mlflow_run_id']}` |")
    best = report["best"]
    lines = [
        f"# finetune-sweep: {plan.name} ({plan.search})",
        "",
        f"Search space: {', '.join(f'`{k}={v}`' for k, v in plan.space().items())}",
        f"Best: trial {best['number']} ({plan.metric}={best['value']:.4f})" if best else "Best: none (no trial completed)",
        f"MLflow parent run: `{report['mlflow_run_id']}` in `{report['tracking_uri']}`",
        "",
        *rows,
    ]
    if report["registered"]:
        lines += ["", "Registered: " + ", ".join(f"trial {r['trial']} → {r['model_name']} v{r['model_version']} "
                                                 f"({', '.join(r['aliases']) or 'no alias'})" for r in report["registered"])]
    return "\n".join(lines) + "\n"


def plot(plan: SweepPlan, trials: list[Trial], out: Path) -> Path | None:
    """Objective vs each swept parameter (one panel per key), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scored = [t for t in trials if t.value is not None]
    fig, axes = plt.subplots(1, len(plan.params), figsize=(4.5 * len(plan.params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], plan.params, strict=True):
        xs = [t.params.get(param.key, "") for t in scored]
        try:
            numbers = [float(x) for x in xs]
            ax.scatter(numbers, [t.value for t in scored])
            if param.log or (numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= 100):
                ax.set_xscale("log")
        except ValueError:  # categorical: model names, ...
            ax.scatter(xs, [t.value for t in scored])
        ax.set_xlabel(param.key)
        ax.set_ylabel(plan.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{plan.name}: {plan.metric} per trial")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _open_parent(plan: SweepPlan, flow_run_id: str):
    """The sweep's MLflow run. A resumed Optuna study reattaches to the run it started with (recorded in the
    study), so a sweep stopped halfway still has one parent run; the children it left running are closed."""
    from mlflow.exceptions import MlflowException

    from stages.tracking import RunInfo, client, open_run

    study = open_study(plan) if plan.search == "optuna" else None
    run_id = study.user_attrs.get("mlflow_run_id") if study is not None else None
    mlflow_client = client(_tracking_uri(plan))
    try:
        run = mlflow_client.get_run(run_id) if run_id else None
    except MlflowException:
        run = None  # the MLflow store was reset: a new parent run
    if run is None:
        parent = open_run(plan.base, flow_run_id=flow_run_id,
                          extra_tags={"sweep.role": "parent", "sweep.name": plan.name, "sweep.search": plan.search})
        if study is not None:
            study.set_user_attr("mlflow_run_id", parent.run_id)
        return parent
    mlflow_client.update_run(run.info.run_id, status="RUNNING")
    for child in mlflow_client.search_runs([run.info.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'")):
        mlflow_client.set_terminated(child.info.run_id, status="KILLED")  # the trial a killed sweep was running
    return RunInfo(run_id=run.info.run_id, tracking_uri=_tracking_uri(plan), experiment_id=run.info.experiment_id,
                   flow_run_id=flow_run_id)


def _finetune_sweep(overrides: list[str]) -> dict[str, Any]:
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from stages.tracking import client, end_run, log_metrics, log_params_once

    started = time.monotonic()
    plan = plan_sweep(overrides)
    logger = get_run_logger()
    set_trial_limit(plan)
    parent = _open_parent(plan, str(flow_run.get_id() or ""))
    mlflow_client = client(parent.tracking_uri)
    log_params_once(parent, {f"sweep.space.{k}": v for k, v in plan.space().items()} | {"sweep.metric": plan.metric})
    try:
        trials = (run_optuna if plan.search == "optuna" else run_grid)(plan, parent.run_id, logger)
        best = best_trial(trials, plan.higher_is_better)
        registered = _register(plan, trials, logger)
    except BaseException:
        end_run(parent, "FAILED")
        raise
    report = {
        "sweep": plan.name,
        "search": plan.search,
        "space": plan.space(),
        "metric": plan.metric,
        "higher_is_better": plan.higher_is_better,
        "mlflow_run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "max_parallel": plan.base.sweep.max_parallel,
        "concurrency_limit": plan.trial_limit,
        "trials": [t.summary() for t in ranked(trials, plan.higher_is_better)],
        "best": best.summary() if best else None,
        "registered": registered,
        "counts": {s: sum(t.state == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAILED")},
        "seconds": round(time.monotonic() - started, 1),
    }
    if best is not None:
        log_metrics(parent, {f"best_{plan.metric}": best.value}, step=0)
        mlflow_client.set_tag(parent.run_id, "sweep.best_trial", str(best.number))
        mlflow_client.set_tag(parent.run_id, "sweep.best_run_id", str(best.mlflow_run_id))
        mlflow_client.set_tag(parent.run_id, "sweep.best_overrides", " ".join(best.own))
    for state, count in report["counts"].items():
        mlflow_client.set_tag(parent.run_id, f"sweep.{state.lower()}", str(count))
    markdown = _markdown(plan, report)
    plan.folder.mkdir(parents=True, exist_ok=True)
    (plan.folder / "trials.md").write_text(markdown)
    mlflow_client.log_artifact(parent.run_id, str(plan.folder / "trials.md"), "sweep")
    figure = plot(plan, trials, plan.folder / "metric_vs_params.png")
    if figure is not None:
        mlflow_client.log_artifact(parent.run_id, str(figure), "sweep")
    else:
        logger.warning("sweep %s: matplotlib is not installed: no plot of %s vs the swept keys", plan.name, plan.metric)
    report["plot"] = str(figure) if figure else None
    create_markdown_artifact(markdown=markdown, key="finetune-sweep-report",
                             description="Trials of the sweep, best first")
    end_run(parent, "FINISHED")
    write_json_atomic(plan.folder / "report.json", report, sort_keys=False)
    logger.info("sweep %s: %s", plan.name, report["counts"])
    return report


def finetune_sweep():
    """The `finetune-sweep` Prefect flow (built on first use: Prefect is imported only after runtime.configure)."""
    global _FLOW
    if _FLOW is None:
        from prefect import flow

        _FLOW = flow(name="finetune-sweep")(_finetune_sweep)
    return _FLOW


_FLOW = None


# --- the command line --------------------------------------------------------------------------------


def _summary(report: dict[str, Any]) -> str:
    lines = [f"Sweep {report['sweep']} ({report['search']}): " + ", ".join(
        f"{n} {s.lower()}" for s, n in report["counts"].items()) + f"; MLflow parent run {report['mlflow_run_id']}"]
    for t in report["trials"]:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        lines.append(f"  trial {t['number']:>3}  {t['state']:<8}  {report['metric']}={value:<8}  {' '.join(t['own'])}"
                     + (f"  ({t['error']})" if t["error"] else ""))
    best = report["best"]
    lines.append(f"Best: trial {best['number']} ({report['metric']}={best['value']:.4f}) {' '.join(best['own'])}"
                 if best else "Best: none (no trial completed)")
    for r in report["registered"]:
        lines.append(f"Registered: trial {r['trial']} as {r['model_name']} v{r['model_version']} "
                     f"(aliases: {', '.join(r['aliases']) or 'none'})")
    lines.append(f"Took {report['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`python -m flows.finetune -m ...` (flows/finetune.py hands sweeps here). Exit codes: module docstring."""
    from flows import runtime
    from flows.finetune import family_preflight, preflight, start_prefect_api

    try:
        plan = plan_sweep(argv)
        runtime.configure(plan.base.paths.root, plan.base.paths.results)
        preflight(plan.base)
        for own in _probes(plan):
            family_preflight(compose(plan.trial_overrides(own)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runtime.create_state_dirs(plan.base.paths.root)
    try:
        start_prefect_api(plan.base)
        report = finetune_sweep()(plan.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the flow logged the traceback already
        print(f"error: the finetune-sweep flow failed: {exc}", file=sys.stderr)
        return 1
    print(_summary(report))
    failed = report["counts"]["FAILED"]
    if failed:
        print(f"error: the sweep completed with failures: {failed} of {len(report['trials'])} trials failed "
              f"(exit code {COMPLETED_WITH_FAILURES})", file=sys.stderr)
        return COMPLETED_WITH_FAILURES
    return 0
