"""trainer.torch_compile and trainer.pad_to_multiple_of: shape buckets that leave the numbers alone, a compiled
forward that keeps the checkpoints' names."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_core.factories import make_trainer


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _recording(trainer) -> list[dict]:
    seen, collate = [], trainer.data_collator

    def record(rows):
        batch = collate(rows)
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    trainer.data_collator = record
    return seen


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("family", ["text_classification", "token_classification"])
def test_buckets_round_lengths_up_and_change_nothing_but_float_noise(tmp_path, family) -> None:
    plain = make_trainer(tmp_path / "plain", family=family, metrics=())
    plain.train()
    bucketed = make_trainer(tmp_path / "bucketed", family=family, metrics=(), pad_to_multiple_of=8)
    seen = _recording(bucketed)
    bucketed.train()
    assert seen and all(b["input_ids"].shape[1] % 8 == 0 for b in seen)
    assert any(b["attention_mask"].sum(1).max() % 8 for b in seen)  # some batches really were padded further
    for batch in seen:  # padding is masked out, and padded labels are ignored
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == 0).all()
        if family == "token_classification":
            assert (batch["labels"][pad] == -100).all()
    assert _losses(bucketed) == pytest.approx(_losses(plain), rel=1e-5)


def test_images_have_no_length_to_pad(tmp_path) -> None:
    from trainer_core.args import TrainingArguments
    from trainer_core.spec import TaskSpec
    from trainer_core.trainer import Trainer

    args = TrainingArguments(pad_to_multiple_of=8, max_steps=1)
    with pytest.raises(ValueError, match="trainer.pad_to_multiple_of=8: task.family=image_classification"):
        Trainer(torch.nn.Linear(2, 2), args, task_spec=TaskSpec(family="image_classification", num_labels=2),
                output_dir=tmp_path)


def test_a_compiled_forward_trains_the_same_and_saves_the_same_names(tmp_path) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    eager = make_trainer(tmp_path / "eager", metrics=(), pad_to_multiple_of=16, save_strategy="steps", save_steps=6)
    eager.train()
    counter = CompileCounter()  # a backend that counts the graphs it is handed, then runs them eagerly
    compiled = make_trainer(tmp_path / "compiled", metrics=(), torch_compile=True, torch_compile_backend=counter,
                            save_strategy="steps", save_steps=6)
    seen = _recording(compiled)
    compiled.train()
    assert counter.frame_count >= 1  # the forward ran through torch.compile
    assert {b["input_ids"].shape[1] for b in seen} == {16}  # compiling buckets to 16 by default: one shape
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-5)
    from safetensors import safe_open

    names = []
    for trainer in (eager, compiled):
        (folder,) = (trainer.output_dir / "checkpoints").glob("step-*")
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])
