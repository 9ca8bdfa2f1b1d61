"""Fine-tune, evaluate, predict and register a model in one command.

    python -m flows.finetune                                   # offline default: MiniLM on Rotten Tomatoes
    python -m flows.finetune model=tiny_bert trainer.max_steps=30
    python -m flows.finetune task=glue task.subset=sst2 model=bert_base_uncased trainer.learning_rate=3e-5
    python -m flows.finetune hardware=ddp_2cpu
    python -m flows.finetune -m trainer.learning_rate=1e-5,3e-5 trainer.seed=1,2   # a sweep: see flows/sweep.py
    python -m flows.finetune reproduce=models:/rt_reviews-minilm_l6/1 paths.root=/tmp/again \
        tracking.uri=sqlite:///$PWD/.finetune/mlflow.db    # re-create a version, compare the weights

Arguments are Hydra overrides of conf/finetune.yaml. Bad input is reported before anything expensive starts,
as one message naming the key and the fix (exit code 2). The run ends by printing the MLflow run id, the
registered model version and its aliases, and the final metrics; the same report is written to
<paths.root>/last_report.json.
"""

from __future__ import annotations

import gc
import importlib
import json
import signal
import sys
from pathlib import Path

from flows import runtime
from flows.config import compose, hand_over
from flows.temporary_api import TemporaryAPI
from stages.schema import ConfigError, FinetuneConfig
from trainer_core.files import write_json_atomic


def preflight(cfg: FinetuneConfig) -> None:
    """Checks that need more than the config itself: the servers, the model's files, the hardware, the data."""
    quick_preflight(cfg)
    data_preflight(cfg)


def quick_preflight(cfg: FinetuneConfig) -> None:
    """The servers, the hardware, the model's files: what answers in well under a second."""
    from stages.launch import preflight as hardware_preflight

    servers_preflight(cfg)
    hardware_preflight(cfg.hardware, cfg.trainer.mixed_precision, cfg.trainer.bf16_full_eval)
    family_preflight(cfg)
    peft_preflight(cfg)


def data_preflight(cfg: FinetuneConfig) -> None:
    """The raw data loads and matches the task config (columns present, labels in range). Skipped where the
    prepare_data stage holds a valid result for this config: the flow will not read the raw data then (its key
    names the data source, as the stage's cache does), and a cached run need not import datasets and torch."""
    from stages.sources import load_raw

    if not (Path(cfg.paths.root) / "stages" / "prepare_data").is_dir():  # nothing prepared: nor is prefect imported
        load_raw(cfg.task, cfg.paths.root, hand_over=True)  # the flow's prepare_data stage reads it from here
        return
    from stages.caching import stage_dir, stage_key
    from stages.prepare_data import CODE, NAME
    from stages.refs import Ref

    key = stage_key(NAME, {"task": cfg.task, "model": cfg.model, "paths": cfg.paths}, CODE)
    ref = Ref.load(stage_dir(cfg.paths.root, key) / "ref.json")
    if ref is None or not ref.is_valid():
        load_raw(cfg.task, cfg.paths.root, hand_over=True)


def servers_preflight(cfg: FinetuneConfig) -> None:
    """An http(s) tracking.uri, a set PREFECT_API_URL and a remote paths.results must answer now: MLflow's client
    and Prefect's would otherwise retry with back-off for minutes before the first stage fails."""
    import os

    from stages.health import probe

    uri = cfg.tracking.uri or ""
    if uri.startswith(("http://", "https://")) and (problem := probe(uri)):
        raise ConfigError(
            f"tracking.uri={uri}: the MLflow server does not answer ({problem}). Start it (`mlflow server --host "
            "127.0.0.1 --port 5000`) or drop tracking.uri to use the local store under paths.root."
        )
    results = runtime.results_location(cfg.paths.root, cfg.paths.results)
    if runtime.is_remote(results):  # the flow probes it again; here it is refused before the API and stores start
        runtime.probe_results(results)
    api_url = os.environ.get("PREFECT_API_URL", "")
    if TemporaryAPI.current is not None and api_url == TemporaryAPI.current.url:
        return  # ours, still booting: start_prefect_api waits for it
    if api_url.startswith(("http://", "https://")) and (problem := probe(api_url)):
        raise ConfigError(
            f"PREFECT_API_URL={api_url}: the Prefect API does not answer ({problem}). Start it (`prefect server "
            "start --host 127.0.0.1`) or unset PREFECT_API_URL to run on a temporary local API."
        )


def family_preflight(cfg: FinetuneConfig) -> None:
    """The task family's refusals of this model and these training arguments (an encoder for causal_lm,
    group_by_length for images, block_size beyond the model's positions), before any data is read."""
    from stages.common import resolve_model_path
    from trainer_core.spec import ModelSpec
    from trainer_core.tasks import get_task

    family = get_task(cfg.task.family)(cfg.task.spec())
    model = ModelSpec(name_or_path=resolve_model_path(cfg.model), config=dict(cfg.model.config),
                      revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    errors = family.model_errors(model) + family.training_errors(cfg.trainer)
    if errors:
        raise ConfigError("Config is not well-formed, found the following errors:\n - " + "\n - ".join(errors))


def peft_preflight(cfg: FinetuneConfig) -> None:
    """peft=qlora needs CUDA and bitsandbytes; every peft.target_modules entry must match a module of the model
    (checked on a weightless copy built from the model's config, so nothing is loaded)."""
    if not cfg.peft.enabled:
        return
    import importlib.util

    import torch

    if cfg.peft.load_in_4bit and not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        raise ConfigError(f"peft={cfg.peft.name} (peft.load_in_4bit=true) needs a CUDA GPU and bitsandbytes, which "
                          "this machine lacks: use peft=lora (or peft=dora) here.")
    from stages.common import resolve_model_path
    from trainer_core import adapters
    from trainer_core.spec import ModelSpec
    from trainer_core.tasks import _common, get_task

    config = _common.as_model_config(ModelSpec(name_or_path=resolve_model_path(cfg.model), config=dict(cfg.model.config)))
    if config is None:
        return  # a Hub id: the ranks check the targets once the model has loaded
    labels = ("num_labels", "id2label", "label2id", "architectures", "_name_or_path", "transformers_version")
    skeleton = ModelSpec(config={k: v for k, v in config.to_dict().items() if k not in labels})
    with torch.device("meta"):
        model = get_task(cfg.task.family)(cfg.task.spec()).build_model(skeleton)
    errors = adapters.target_errors(model, cfg.peft.spec())
    if errors:
        raise ConfigError("Config is not well-formed, found the following errors:\n - " + "\n - ".join(errors))


def _summary(report: dict) -> str:
    from stages.tracking import CANDIDATE, CHAMPION

    lines = [
        f"MLflow run:        {report['mlflow_run_id']} ({report['tracking_uri']})",
        f"Registered model:  {report['model_name']} version {report['model_version']}"
        f" (aliases: {', '.join(report['aliases']) or 'none'})",
        f"Load it with:      mlflow.pyfunc.load_model('models:/{report['model_name']}@"
        f"{CHAMPION if CHAMPION in report['aliases'] else CANDIDATE}')",
        "Stages:            " + ", ".join(f"{k}={v}" for k, v in report["stages"].items()),
        "Final metrics:",
        *(f"  {k:<24} {v:.4f}" for k, v in report["metrics"].items()),
        f"Took {report['seconds']} s (flow body)",
    ]
    return "\n".join(lines)


def reproduce(overrides: list[str]) -> int:
    """`reproduce=models:/<name>/<version>` (or `@alias`): run the version's recorded overrides again (the other
    overrides, e.g. paths.root and tracking.uri, say where), naming what differs from this checkout first, and
    report whether the new weights equal the registered ones."""
    from stages import lineage
    from stages.caching import code_version
    from stages.refs import file_sha256
    from stages.tracking import tracking_uri

    reference = [o for o in overrides if o.startswith("reproduce=")][-1].split("=", 1)[1]
    extra = [o for o in overrides if not o.startswith("reproduce=")]
    try:
        recorded = lineage.find(reference, tracking_uri(compose(extra)))
        replay = lineage.replay_overrides(recorded, extra)
        cfg = compose(replay)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    differences = lineage.differences(recorded, f"src:{code_version('stages', 'trainer_core', 'flows')[:16]}")
    for difference in differences:
        print(f"reproduce: warning: {difference}", file=sys.stderr)
    print(f"reproduce: {recorded.name} v{recorded.version} with {' '.join(replay) or 'the defaults'}", flush=True)
    code = main(replay)
    if code != 0:
        return code
    report = json.loads(Path(cfg.paths.root, "last_report.json").read_text())
    weights = file_sha256(Path(report["run_dir"]) / "final" / "model.safetensors")
    if weights == recorded.tags.get("model_fingerprint"):
        print(f"reproduce: the weights equal {reference} bit for bit (sha256 {weights[:16]}…)")
        return 0
    why = "; ".join(differences) or "nothing recorded differs (a nondeterministic kernel or data source?)"
    print(f"error: reproduce: the weights differ from {reference} (sha256 {weights[:16]}… vs "
          f"{recorded.tags.get('model_fingerprint', '?')[:16]}…): {why}", file=sys.stderr)
    return 1


def start_prefect_api(cfg: FinetuneConfig, api: TemporaryAPI | None = None) -> None:
    """Where no PREFECT_API_URL is set, start the temporary Prefect API (flows/temporary_api.py; `api`: started
    already) and, while it boots, import the flow's modules (prefect among them: only now that its environment is
    set), open the MLflow store and, where the prepare_data stage will run, import its tokenizer's modules; return
    once the API answers (RuntimeError if it does not)."""
    api = api or TemporaryAPI.start()
    if api is None:
        return
    from prefect.logging import get_logger

    import flows.pipeline  # noqa: F401
    from stages.sources import handed_over
    from stages.tokenizers import IMPORTS as tokenizer_imports
    from stages.tracking import ensure_store, tracking_uri

    get_logger().info("Temporary Prefect API on %s (no PREFECT_API_URL set; it stops with this run)", api.url)
    try:
        ensure_store(tracking_uri(cfg))
    except Exception:  # noqa: BLE001 - the flow opens the store again and reports what fails there
        pass
    if handed_over(cfg.task, cfg.paths.root):  # the prepare_data stage will run: its tokenizer's imports (~2 s)
        importlib.import_module(tokenizer_imports)
    api.wait()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else list(argv)
    if overrides and overrides[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from flows import sweep

    if sweep.is_sweep(overrides):  # -m or sweep.search=optuna: the finetune-sweep flow (flows/sweep.py)
        return sweep.main(overrides)
    if any(o.startswith("reproduce=") for o in overrides):
        return reproduce(overrides)
    api = None
    try:
        cfg = compose(overrides)
        runtime.configure(cfg.paths.root, cfg.paths.results)
        if (Path(cfg.paths.root) / "prefect" / "prefect.db").is_file():  # a root in use: the API writes nothing new
            api = TemporaryAPI.start()  # so it boots during the preflight already
        preflight(cfg)
    except ConfigError as exc:
        if api is not None:
            api.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        runtime.create_state_dirs(cfg.paths.root)
    except OSError as exc:  # a file on the way, no permission, a read-only or pseudo file system
        print(f"error: paths.root={cfg.paths.root}: cannot create the state folder there ({exc}); point paths.root "
              "at a folder you can write (it is created if missing).", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler, `timeout`, `kill`) stops the flow as Ctrl-C does: the train stage then SIGTERMs its
    # ranks, which checkpoint the step they are at (trainer.save_on_sigterm) before they exit; the temporary API
    # stops at the exit
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start_prefect_api(cfg, api)
    except KeyboardInterrupt:
        print("error: interrupted before the flow started", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from flows.pipeline import finetune  # imports prefect: only now that its environment is set

    try:
        hand_over(overrides, cfg)
        report = finetune(overrides)
    except KeyboardInterrupt:
        print("error: interrupted; the ranks saved the step they were at: run the same command to resume",
              file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the flow logged the traceback already
        print(f"error: the finetune flow failed: {exc}", file=sys.stderr)
        return 1
    write_json_atomic(Path(cfg.paths.root, "last_report.json"), report, sort_keys=False)
    print(_summary(report))
    return 0


if __name__ == "__main__":
    code = main()
    # Everything alive now lives until the exit: the interpreter's final garbage collections over prefect's,
    # mlflow's and sqlalchemy's objects cost ~2 s and free nothing that matters (atexit handlers still run).
    gc.freeze()
    sys.exit(code)
