"""LoRA through the Trainer (trainer_core.adapters): what trains, what a checkpoint holds, bitwise resume,
refusals, final/ merged, warm start from an adapter. In-process on a tiny BERT, a few steps each.

    .venv/bin/python -m pytest tests/trainer_core/test_adapters.py -q
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_core.factories import make_dataset, make_trainer, tiny_model
from trainer_core import adapters
from trainer_core import checkpoint as ckpt

LORA = dict(method="lora", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"],
            modules_to_save=[], use_rslora=False, init_lora_weights=True, use_dora=False, load_in_4bit=False)
ARGS = dict(max_steps=6, save_strategy="steps", save_steps=2, dropout=0.1)


def _lora_trainer(path, peft=LORA, seed=3, **kwargs):
    from trainer_core.spec import TaskSpec
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    base = make_trainer(path, **{**ARGS, **kwargs})  # its arguments, data and plan; the model is ours
    torch.manual_seed(seed)
    model = adapters.wrap(tiny_model(dropout=0.1, seed=3), peft)
    return Trainer(model, base.args, train_dataset=base.train_dataset, eval_dataset=base.eval_dataset,
                   batch_plan=base.plan, output_dir=path, task=get_task("text_classification"),
                   task_spec=TaskSpec(), config_hash=f"lora-r{peft['r']}", config_components=adapters.components(peft))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_only_adapters_and_head_get_gradients_and_the_base_stays_bit_identical(tmp_path):
    trainer = _lora_trainer(tmp_path / "run", save_strategy="no")
    model = trainer.model
    trainable = adapters.trainable_names(model)
    # LoRA A/B of query and value in both layers, and the classifier (the task head) in full
    assert {n for n in trainable if "lora_" in n} and all("lora_" in n or ".classifier.modules_to_save." in n
                                                           for n in trainable)
    assert any(".classifier.modules_to_save." in n for n in trainable)
    batch = trainer.data_collator([make_dataset(4)[i] for i in range(4)])
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    model.zero_grad(set_to_none=True)

    before = _weights(trainer)
    trainer.train()
    after = _weights(trainer)
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n or "modules_to_save" in n)


def test_checkpoint_holds_only_what_trains(tmp_path):
    trainer = _lora_trainer(tmp_path / "run")
    trainer.train()
    folder = ckpt.checkpoint_dir(tmp_path / "run", 6)
    tensors = load_file(str(folder / "model.safetensors"))
    assert set(tensors) == adapters.trainable_names(trainer.model)
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(tensors)  # Adam moments of the trained tensors only
    full = make_trainer(tmp_path / "full", **ARGS)
    full.train()
    full_size = (ckpt.checkpoint_dir(tmp_path / "full", 6) / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size * 5 < full_size


def test_killed_lora_run_resumes_bitwise_identical(tmp_path):
    reference = _lora_trainer(tmp_path / "ref")
    reference.train()
    expected = _weights(reference)

    run = _lora_trainer(tmp_path / "run")
    run.train()
    # as if killed right after step 2's checkpoint: the relaunch builds a fresh model (other LoRA init)
    for step in (4, 6):
        shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "run", step))
    relaunch = _lora_trainer(tmp_path / "run", seed=99)
    relaunch.setup()
    assert relaunch.state.global_step == 2
    relaunch.train()
    resumed = _weights(relaunch)
    assert set(resumed) == set(expected)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


def test_resume_with_another_lora_rank_is_refused_naming_it(tmp_path):
    _lora_trainer(tmp_path / "run", max_steps=2).train()
    other = _lora_trainer(tmp_path / "run", peft={**LORA, "r": 8, "target_modules": ["query"]}, max_steps=2)
    with pytest.raises(ValueError) as err:
        other.setup()
    message = str(err.value)
    assert "peft.r: 4 in the checkpoint, 8 in this run" in message
    assert "peft.target_modules: 'query,value' in the checkpoint, 'query' in this run" in message


def test_final_is_the_merged_model_and_adapter_alone_beside_it(tmp_path):
    from transformers import AutoModelForSequenceClassification

    trainer = _lora_trainer(tmp_path / "run", save_strategy="no")
    trainer.train()
    final = trainer.save_final()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert not any("lora" in n for n in merged.state_dict())  # a plain transformers model
    batch = trainer.data_collator([make_dataset(4)[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trainer.model(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["final/adapter", "checkpoints/step-00000006"])
def test_warm_start_from_a_saved_adapter_loads_its_tensors(tmp_path, source):
    trainer = _lora_trainer(tmp_path / "src")
    trainer.train()
    trainer.save_final()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    fresh = _lora_trainer(tmp_path / "new", seed=5, max_steps=1, save_strategy="no", warm_start=True,
                          resume_from_checkpoint=str(tmp_path / "src" / source))
    fresh.setup()
    assert fresh.state.global_step == 0
    own = dict(fresh.accelerator.unwrap_model(fresh.model).named_parameters())
    for name, value in trained.items():
        assert torch.equal(own[name], value), name


def test_unmatched_target_modules_list_what_exists():
    with pytest.raises(ValueError) as err:
        adapters.wrap(tiny_model(), {**LORA, "target_modules": ["q_proj", "value"]})
    message = str(err.value)
    assert "peft.target_modules: q_proj match(es) no module" in message
    assert "query" in message and "dense" in message  # what the model has


def test_rank_zero_is_refused_by_name():
    with pytest.raises(ValueError, match=r"peft\.r=0: the LoRA rank must be > 0"):
        adapters.wrap(tiny_model(), {**LORA, "r": 0})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_refused_by_name():
    with pytest.raises(ValueError, match=r"peft=qlora .*needs a CUDA GPU"):
        adapters.wrap(tiny_model(), {**LORA, "load_in_4bit": True})


def test_full_fine_tune_is_untouched():
    model = tiny_model()
    assert adapters.wrap(model, {}) is model
    assert adapters.trainable_only(model, model.state_dict()).keys() == model.state_dict().keys()
