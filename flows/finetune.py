"""Fine-tune, evaluate, predict and register a model in one command.

    python -m flows.finetune                                   # offline default: MiniLM on Rotten Tomatoes
    python -m flows.finetune model=tiny_bert trainer.max_steps=30
    python -m flows.finetune task=glue task.subset=sst2 model=bert_base_uncased trainer.learning_rate=3e-5
    python -m flows.finetune hardware=ddp_2cpu

Arguments are Hydra overrides of conf/finetune.yaml. Bad input is reported before anything expensive starts,
as one message naming the key and the fix (exit code 2). The run ends by printing the MLflow run id, the
registered model version and its aliases, and the final metrics; the same report is written to
<paths.root>/last_report.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows import runtime
from flows.config import ConfigError, FinetuneConfig, compose


def preflight(cfg: FinetuneConfig) -> None:
    """Checks that need more than the config itself: the data, the model's files, the hardware."""
    from stages.common import resolve_model_path
    from stages.launch import preflight as hardware_preflight
    from stages.sources import load_raw

    hardware_preflight(cfg.hardware, cfg.trainer.mixed_precision)
    resolve_model_path(cfg.model)
    load_raw(cfg.task, cfg.paths.root)


def _summary(report: dict) -> str:
    lines = [
        f"MLflow run:        {report['mlflow_run_id']} ({report['tracking_uri']})",
        f"Registered model:  {report['model_name']} version {report['model_version']}"
        f" (aliases: {', '.join(report['aliases']) or 'none'})",
        f"Load it with:      mlflow.pyfunc.load_model('models:/{report['model_name']}@"
        f"{'champion' if 'champion' in report['aliases'] else 'candidate'}')",
        "Stages:            " + ", ".join(f"{k}={v}" for k, v in report["stages"].items()),
        "Final metrics:",
        *(f"  {k:<24} {v:.4f}" for k, v in report["metrics"].items()),
        f"Took {report['seconds']} s (flow body)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else list(argv)
    if overrides and overrides[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = compose(overrides)
        runtime.configure(cfg.paths.root)
        preflight(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runtime.create_state_dirs(cfg.paths.root)
    from flows.pipeline import finetune  # imports prefect: only now that its environment is set

    try:
        report = finetune(overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the flow logged the traceback already
        print(f"error: the finetune flow failed: {exc}", file=sys.stderr)
        return 1
    Path(cfg.paths.root, "last_report.json").write_text(json.dumps(report, indent=2))
    print(_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
