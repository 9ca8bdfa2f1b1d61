"""The whole flow with peft=lora on a tiny model, as a user runs it: `python -m flows.finetune peft=lora ...`.

Checkpoints hold only the adapters and the head; final/ is the merged model (evaluate, predict, register and
serving unchanged) with the adapter alone in final/adapter/; the model version says how it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.pipeline.helpers import FAST, report

pytestmark = pytest.mark.integration


def test_lora_flow_trains_adapters_only_and_registers_the_merged_model(run_cli, tmp_path) -> None:
    root = tmp_path / "state"
    done = run_cli([*FAST, "peft=lora", "peft.r=4", "peft.target_modules=[query,value]", f"paths.root={root}"])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    rep = report(root)
    assert rep["global_step"] == 24
    run_dir = Path(rep["run_dir"])
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["peft"]["r"] == 4 and spec["peft"]["target_modules"] == ["query", "value"]

    # a checkpoint: LoRA A/B of query and value (2 layers) and the classifier in full, nothing of the base
    step = run_dir / "checkpoints" / "step-00000024"
    names = set(load_file(str(step / "model.safetensors")))
    assert len([n for n in names if ".lora_" in n]) == 2 * 2 * 2
    assert names - {n for n in names if ".lora_" in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"}
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["config_components"]["peft.r"] == 4

    # final/: a plain transformers model (merged), plus the adapter alone
    final = run_dir / "final"
    assert not any("lora" in n for n in load_file(str(final / "model.safetensors")))
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert 0.0 <= rep["metrics"]["validation_accuracy"] <= 1.0 and "test_accuracy" in rep["metrics"]

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    version = client.get_model_version(rep["model_name"], rep["model_version"])
    assert version.tags["peft.method"] == "lora"
    assert version.tags["peft.r"] == "4" and version.tags["peft.target_modules"] == "query,value"
    assert version.tags["peft.registered_as"] == "merged"
    assert client.get_run(rep["mlflow_run_id"]).data.params["peft.r"] == "4"
