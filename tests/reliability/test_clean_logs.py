"""The default run's log holds one-line events: no disassembled bytecode, no multi-line LOAD REPORT table.

The bytecode came from `datasets` fingerprinting the tokenize function with dill (its `dis.dis` output went
through print, which the flow turned into log records); the table is transformers' load report of a checkpoint
without the classifier head. tiny_bert is loaded here from a saved checkpoint so that the head is missing, as in
the default run with MiniLM.
"""

from __future__ import annotations

import re

import pytest

from tests.pipeline.helpers import FAST

pytestmark = pytest.mark.integration
BYTECODE = re.compile(r"^\s*(\d+\s+)?(>>\s+)?\d+\s+[A-Z_]{4,}(\s|$)")
OPCODES = re.compile(r"\b(LOAD_FAST|LOAD_GLOBAL|LOAD_CONST|RETURN_VALUE|STORE_FAST|Disassembly of)\b")


def _message(line: str) -> str:
    """A Prefect record's message (after `HH:MM:SS.mmm | LEVEL | Task run 'x' - `), else the line."""
    return line.split(" - ", 1)[1] if re.match(r"^\d\d:\d\d:\d\d\.\d+ \| ", line) and " - " in line else line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny_bert-sized BertModel (no classifier head) saved like a pretrained checkpoint."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert_base")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512, vocab_size=2100)
    BertModel(config).save_pretrained(folder)
    return folder


def test_default_run_logs_one_line_events(run_cli, checkpoint, tmp_path) -> None:
    overrides = [*FAST, "trainer.max_steps=4", "trainer.save_steps=4", "task.max_train_samples=128",
                 "task.max_eval_samples=32", "task.max_predict_samples=32", f"model.name_or_path={checkpoint}",
                 f"paths.root={tmp_path / 'state'}"]
    done = run_cli(overrides, env={"CI": "1"})  # CI=1: transformers would propagate its records twice
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = output.splitlines()
    bytecode = [line for line in lines if BYTECODE.match(_message(line)) or OPCODES.search(line)]
    assert bytecode == [], "\n".join(bytecode[:10])
    assert "LOAD REPORT" not in output
    assert "Downloading artifacts" not in output and "UserWarning" not in output
    # libraries' own start-up chatter: DeepSpeed's accelerator guess, MLflow's table creation
    assert "Setting accelerator to CPU" not in output and "MLflow database tables" not in output
    assert not any(line.startswith(("- MISSING:", "Notes:", "Key ")) or "------+---" in line for line in lines)
    # the load report as one line, from the one rank; the run's events each on their line
    loaded = [line for line in lines if "newly initialised (MISSING): classifier" in line]
    assert len(loaded) == 1, output[-4000:]
    for event in ("prepare_data: {'train': 128", "batch_plan: 4 optimizer steps", "train: finished at step 4",
                  "evaluate: loss=", "predict: 32 rows", "register: created"):
        assert sum(event in line for line in lines) == 1, event
