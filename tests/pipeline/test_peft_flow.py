"""The whole flow with peft=lora on a tiny model, as a user runs it: `python -m flows.finetune peft=lora ...`.

Checkpoints hold only the adapters and the head; final/ is the merged model (evaluate, predict, register and
serving unchanged) with the adapter alone in final/adapter/; the model version says how it was trained. The same
run registered with registry.merge_adapter=false (train, evaluate and predict come from the cache) is a second
version holding the adapter and a pinned base, and a fresh process serving both gets the same predictions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.pipeline.helpers import FAST, REPO, report, run_cli

pytestmark = pytest.mark.integration

TEXTS = ["a warm and clever film.", "dull, flat and far too long", "the cast is superb", "messy script!", "ok"]


def _write_base(folder: Path) -> Path:
    """A pretrained-like tiny BERT (random weights, saved) with a character-level WordPiece vocabulary: a base
    with weights to pin, as registry.merge_adapter=false needs (model=tiny_bert alone is a random init)."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_flow(tmp_path_factory):
    """One LoRA flow on the tiny pretrained base, registered merged (the default)."""
    tmp = tmp_path_factory.mktemp("peft_flow")
    base = _write_base(tmp / "base")
    root = tmp / "state"
    overrides = [*FAST, f"model.name_or_path={base}", "model.tokenizer=pretrained", "model.config={}",
                 "peft=lora", "peft.r=4", "peft.target_modules=[query,value]", f"paths.root={root}"]
    done = run_cli(overrides)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return root, overrides, report(root)


def test_lora_flow_trains_adapters_only_and_registers_the_merged_model(lora_flow) -> None:
    root, _, rep = lora_flow
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


PREDICT = """
import json, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
out = {}
for uri in sys.argv[2:]:
    frame = mlflow.pyfunc.load_model(uri).predict(json.loads(os.environ["TEXTS"]))
    out[uri] = {"label": [str(x) for x in frame["label"]], "score": [float(x) for x in frame["score"]]}
print("PREDICTIONS " + json.dumps(out))
"""


def test_merged_and_adapter_registrations_predict_the_same_from_a_fresh_process(lora_flow) -> None:
    root, overrides, merged = lora_flow
    weights = Path(merged["run_dir"]) / "final" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    done = run_cli([*overrides, "registry.merge_adapter=false"])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    adapter = report(root)
    # the same training (cached: same run folder and weights), registered a second way as a second version
    assert adapter["run_dir"] == merged["run_dir"] and weights.stat().st_mtime_ns == trained_at
    assert adapter["model_name"] == merged["model_name"] and adapter["model_version"] != merged["model_version"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    tags = client.get_model_version(adapter["model_name"], adapter["model_version"]).tags
    assert tags["peft.registered_as"] == "adapter"
    assert tags["peft.base"].endswith("base") and len(tags["peft.base_sha256"]) == 64

    # a fresh process with nothing but the registry: models:/<name>/<version> of each
    uris = [f"models:/{rep['model_name']}/{rep['model_version']}" for rep in (merged, adapter)]
    scratch = root / "fresh-tmp"  # the fresh process's temporary folder
    scratch.mkdir()
    env = {**os.environ, "TEXTS": json.dumps(TEXTS), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TMPDIR": str(scratch)}
    fresh = subprocess.run([sys.executable, "-c", "import os\n" + PREDICT, f"sqlite:///{root}/mlflow.db", *uris],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    assert not list(scratch.glob("adapter-base-*"))  # the adapter's base folder of links is gone after loading
    line = next(x for x in fresh.stdout.splitlines() if x.startswith("PREDICTIONS "))
    found = json.loads(line.removeprefix("PREDICTIONS "))
    assert len(found[uris[0]]["score"]) == len(TEXTS)
    assert len(set(found[uris[0]]["score"])) > 1  # the inputs are told apart, so equality says something
    assert found[uris[1]] == found[uris[0]]  # exactly: the same merge of the same tensors
