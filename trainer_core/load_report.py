"""transformers' LOAD REPORT table as one log line.

    from trainer_core import load_report
    load_report.one_line()      # before from_pretrained; idempotent

transformers 5 logs a multi-line table (`utils/loading_report.py`, a WARNING of `transformers.modeling_utils`)
whenever a checkpoint misses weights of the model it loads into, e.g. the new classifier head of a fine-tuning
run, once per rank. This filter rewrites that record into one line on the first rank and drops it on the others:

    BertForSequenceClassification from /models/minilm: newly initialised (MISSING): classifier.bias, classifier.weight
"""

from __future__ import annotations

import logging
import os
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROW = re.compile(r"^\s*(\S+)\s*\|\s*(MISSING|UNEXPECTED|MISMATCH|CONVERSION)\b")
_WHAT = {"MISSING": "newly initialised", "UNEXPECTED": "in the checkpoint but unused",
         "MISMATCH": "re-initialised for a shape mismatch", "CONVERSION": "failed to convert"}
KEYS_SHOWN = 4
"""Key patterns named per status; the rest are counted."""


class OneLineLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        if os.environ.get("RANK", "0") != "0":
            return False  # the same report on every rank: the first one says it
        lines = _ANSI.sub("", message).splitlines()
        model, _, source = lines[0].partition(" LOAD REPORT from: ")
        keys: dict[str, list[str]] = {}
        for line in lines[1:]:
            if match := _ROW.match(line):
                keys.setdefault(match.group(2), []).append(match.group(1))
        parts = []
        for status, names in keys.items():
            shown = ", ".join(names[:KEYS_SHOWN]) + (f" (+{len(names) - KEYS_SHOWN} more)" if len(names) > KEYS_SHOWN else "")
            parts.append(f"{_WHAT[status]} ({status}): {shown}")
        record.msg, record.args = f"{model.strip()} from {source.strip()}: " + "; ".join(parts or ["see above"]), None
        return True


def one_line() -> None:
    """Install the filter on the logger that emits the report (once per process)."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # transformers adds its own stderr handler on first use
    # with CI=1 in the environment transformers also propagates to the root logger: every record twice
    logging.getLogger("transformers").propagate = False
    emitter = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, OneLineLoadReport) for f in emitter.filters):
        emitter.addFilter(OneLineLoadReport())
