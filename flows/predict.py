"""Batch inference with a registered model: read a JSONL or CSV file, write its predictions.

    python -m flows.predict model=models:/rt_reviews-minilm_l6@champion input=reviews.jsonl output=scored.csv
    python -m flows.predict model=models:/glue-mrpc-bert_base_uncased/3 input=pairs.csv output=out.jsonl \
        batch_size=128 tracking_uri=http://127.0.0.1:5000

Arguments (key=value): model (models:/<name>@<alias> or models:/<name>/<version>), input (.jsonl or .csv),
output (.jsonl or .csv: the input's columns plus label and score), batch_size (rows per model call, 256),
log_every (a progress line every this many rows, 1000), tracking_uri (default: $MLFLOW_TRACKING_URI, else
sqlite:///<paths.root>/mlflow.db), root (paths.root for that default).

Input columns: a model of a sentence-pair task reads its two columns by name (e.g. sentence1, sentence2); a
single-text model reads its text column by name, else a column `text`, else the file's only column.

The output is written to a temporary file next to it and renamed at the end: a failure leaves no output.
Bad input prints one line starting with `error:` and exits non-zero (2: arguments, 1: model or data).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from flows.registry import RegistryError, connect, error_line, get_version, parse_model_uri, resolve_tracking_uri

FORMATS = (".jsonl", ".csv")
DEFAULTS = {"batch_size": "256", "log_every": "1000", "tracking_uri": None, "root": None}
REQUIRED = ("model", "input", "output")
log = logging.getLogger("flows.predict")


class UsageError(Exception):
    pass


def parse_args(argv: list[str]) -> dict[str, str | None]:
    args: dict[str, str | None] = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in (*REQUIRED, *DEFAULTS):
            raise UsageError(f"unexpected argument {arg!r}: use key=value with keys {', '.join((*REQUIRED, *DEFAULTS))}")
        args[key] = value
    missing = [k for k in REQUIRED if not args.get(k)]
    if missing:
        raise UsageError(f"missing {', '.join(f'{k}=...' for k in missing)} (see python -m flows.predict --help)")
    for key in ("batch_size", "log_every"):
        if not str(args[key]).isdigit() or int(args[key]) < 1:
            raise UsageError(f"{key}={args[key]!r}: expected a positive whole number")
    for key in ("input", "output"):
        if Path(args[key]).suffix.lower() not in FORMATS:
            raise UsageError(f"{key}={args[key]}: expected a .jsonl or .csv file")
    return args


def read_rows(path: Path):
    """The input file as a DataFrame of strings."""
    import pandas as pd

    if not path.is_file():
        raise RegistryError(f"input file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_json(path, lines=True, dtype=False)
    except ValueError as exc:
        raise RegistryError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def input_columns(frame, wanted: list[str]) -> list[str]:
    """The input's columns that feed the model, in the model's order."""
    if len(wanted) > 1:
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise RegistryError(
                f"input has no column {', '.join(map(repr, missing))}: this model reads {', '.join(wanted)} "
                f"(the file has {', '.join(map(str, frame.columns)) or 'no columns'})"
            )
        return wanted
    for name in (wanted[0], "text"):
        if name in frame.columns:
            return [name]
    if len(frame.columns) == 1:
        return [str(frame.columns[0])]
    names = " or ".join(repr(n) for n in dict.fromkeys((wanted[0], "text")))
    raise RegistryError(
        f"input has no column {names}, and more than one column "
        f"({', '.join(map(str, frame.columns))}): rename the text column to 'text'"
    )


def model_input_columns(version) -> list[str] | None:
    """The model's input columns from its serving.json, fetched alone (not the weights); None if not found."""
    import tempfile as _tempfile

    import mlflow
    import yaml

    try:
        with _tempfile.TemporaryDirectory() as tmp:
            mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source}/MLmodel", dst_path=tmp)).read_text())
            folder = mlmodel["flavors"]["python_function"]["artifacts"]["model_dir"]["path"]
            meta = json.loads(Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source}/{folder}/serving.json", dst_path=tmp)).read_text())
        return _inputs_of(meta)
    except Exception:  # noqa: BLE001 - another layout: the columns are checked once the model is loaded
        return None


def _inputs_of(meta: dict) -> list[str]:
    # input_columns: the task-family contract; text_columns: models registered before it
    return list(meta.get("input_columns") or meta.get("text_columns") or [])


def _outputs_of(python_model) -> list[str]:
    family = getattr(python_model, "family", None)
    return family.output_columns() if family is not None else ["label", "score"]


def _write(frame, path: Path) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        if path.suffix.lower() == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def predict_file(args: dict[str, str | None]) -> int:
    """Run the model over the input file; returns the number of rows written."""
    import pandas as pd

    source, output = Path(args["input"]), Path(args["output"])
    if not output.parent.is_dir():
        raise RegistryError(f"output folder {output.parent} does not exist")
    frame = read_rows(source)
    uri = resolve_tracking_uri(args["tracking_uri"], args["root"])
    client = connect(uri)
    name, ref = parse_model_uri(str(args["model"]))
    version = get_version(client, name, ref)  # a clear error for an unknown name, version or alias

    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    early = model_input_columns(version)
    if early:
        input_columns(frame, early)  # a wrong file fails before the weights are downloaded
    started = time.monotonic()
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    python_model = model.unwrap_python_model()
    wanted = _inputs_of(getattr(python_model, "meta", {})) or ["text"]
    columns = input_columns(frame, wanted)
    log.info("predict: %s v%s (%s), %d rows of %s, loaded in %.1f s", name, version.version, ref, len(frame),
             source, time.monotonic() - started)
    started = time.monotonic()

    batch_size, log_every = int(args["batch_size"]), int(args["log_every"])
    parts, done, next_log = [], 0, log_every
    for start in range(0, len(frame), batch_size):
        chunk = frame.iloc[start : start + batch_size]
        if len(columns) == 1:
            model_input = chunk[columns[0]].astype(str).tolist()  # raw strings: what a one-column signature takes
        else:
            model_input = chunk[columns].astype(str).set_axis(wanted, axis=1).reset_index(drop=True)
        parts.append(model.predict(model_input))
        done += len(chunk)
        if done >= next_log or done == len(frame):
            rate = done / max(time.monotonic() - started, 1e-9)
            log.info("predict: %d/%d rows (%.0f rows/s)", done, len(frame), rate)
            next_log = (done // log_every + 1) * log_every
    outputs = _outputs_of(python_model)
    predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in outputs})
    result = frame.reset_index(drop=True).drop(columns=outputs, errors="ignore")
    result = pd.concat([result, predictions[outputs]], axis=1)
    _write(result, output)
    log.info("predict: wrote %d rows to %s", len(result), output)
    return len(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("mlflow", "transformers", "httpx", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        predict_file(args)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for the user; the model's own errors say what is wrong
        print(error_line(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
