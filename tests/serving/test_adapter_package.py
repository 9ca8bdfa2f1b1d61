"""registry.merge_adapter=false: the registered pyfunc holds the LoRA adapter and a pinned reference to its base
(path + revision + SHA-256), loads base + adapter, and predicts as the merged model does; a changed base is refused.

    .venv/bin/python -m pytest tests/serving/test_adapter_package.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer_core.factories import TINY_BERT, make_dataset

WORDS = [f"w{i}" for i in range(95)]
TEXTS = ["w5 w7 w9", "w12 w3", "w40 w41 w42 w43"]
LORA = dict(method="lora", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
            modules_to_save=[], use_rslora=False, init_lora_weights=True, use_dora=False, load_in_4bit=False)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pretrained-like base folder (BertModel + tokenizer) and the final/ of a LoRA run on it."""
    import datasets
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from stages.refs import DatasetRef, ModelRef
    from trainer_core import adapters
    from trainer_core.args import TrainingArguments
    from trainer_core.spec import ModelSpec, TaskSpec
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    root = tmp_path_factory.mktemp("adapter_package")
    base = root / "base"
    base.mkdir()
    (base / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(base / "vocab.txt"))
    tokenizer.save_pretrained(base)
    config = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    torch.manual_seed(0)
    BertModel(BertConfig(**config)).save_pretrained(base)

    spec = TaskSpec(label_names=["neg", "pos"])
    family = get_task("text_classification")(spec)
    model = adapters.wrap(family.build_model(ModelSpec(name_or_path=str(base))), LORA)
    args = TrainingArguments(per_device_train_batch_size=8, max_steps=4, learning_rate=5e-2, save_strategy="no",
                             disable_tqdm=True, seed=1)
    trainer = Trainer(model, args, train_dataset=make_dataset(24), output_dir=root / "run", task=family,
                      task_spec=spec, tokenizer=tokenizer)
    trainer.train()
    trainer.save_final()
    trainer.cleanup()
    final = root / "run" / "final"
    (root / "run" / "spec.json").write_text(json.dumps({"model": {"name_or_path": str(base), "revision": None}}))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 0]})}
                         ).save_to_disk(root / "data" / "dataset")
    ref = ModelRef(path=str(final), fingerprint="x", run_dir=str(root / "run"), spec_path=str(root / "run" / "spec.json"),
                   global_step=4, training_loss=0.0)
    return root, base, ref, DatasetRef.model_construct(path=str(root / "data"))


def _package(trained, name: str, merge_adapter: bool) -> Path:
    from stages.register import _package_model
    from stages.schema import TaskConfig

    root, _, ref, data = trained
    task = TaskConfig(name="t", loader="rt_reviews", label_names=["neg", "pos"])
    return _package_model(ref, data, task, root / name, merge_adapter=merge_adapter)


def test_adapter_package_pins_its_base_and_predicts_as_the_merged_model(trained) -> None:
    import mlflow

    from trainer_core.files import sha256_file

    _, base, _, _ = trained
    merged = _package(trained, "merged", merge_adapter=True)
    adapter = _package(trained, "adapter", merge_adapter=False)
    weights = adapter / "artifacts" / "weights"
    assert not (weights / "model.safetensors").exists()  # no copy of the base in the registered model
    assert (weights / "adapter" / "adapter_model.safetensors").is_file()
    pinned = json.loads((weights / "base.json").read_text())
    assert pinned == {"name_or_path": str(base), "revision": None, "file": "model.safetensors",
                      "sha256": sha256_file(base / "model.safetensors")}
    assert any(line.startswith("peft==") for line in (adapter / "requirements.txt").read_text().splitlines())

    expected = mlflow.pyfunc.load_model(str(merged)).predict(TEXTS)
    found = mlflow.pyfunc.load_model(str(adapter)).predict(TEXTS)
    assert list(found["label"]) == list(expected["label"])
    assert found["score"].tolist() == pytest.approx(expected["score"].tolist(), abs=1e-5)


def test_adapter_package_refuses_a_base_whose_weights_changed(trained, tmp_path) -> None:
    import shutil

    import mlflow
    from safetensors.torch import load_file, save_file

    _, base, _, _ = trained
    adapter = _package(trained, "adapter_changed", merge_adapter=False)
    backup = tmp_path / "model.safetensors"
    shutil.copy(base / "model.safetensors", backup)
    tensors = load_file(str(base / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(base / "model.safetensors"))
    try:
        with pytest.raises(Exception, match="SHA-256"):
            mlflow.pyfunc.load_model(str(adapter)).predict(TEXTS)
    finally:
        shutil.copy(backup, base / "model.safetensors")
