"""One contract test over every task family found in trainer_core/tasks/ (no hand-kept list).

For each family, on a tiny model and a few rows in the real dataset's schema: raw rows -> features (each with
its example_id) -> two features collate -> loss per example has shape [B] and is finite, items agree with the
targets -> the evaluation step gives the same loss and small per-example tensors -> post-processing gives one
record per example -> metrics are the configured names with finite values.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from tests.tasks.factories import family_cases, tokenizer_for
from trainer_core.tasks import families, get_task
from trainer_core.tasks.base import TaskFamily

FAMILIES = sorted(families())


def test_every_family_is_discovered_and_has_a_case():
    assert {"text_classification", "token_classification"} <= set(FAMILIES)
    assert set(FAMILIES) <= set(family_cases()), "add tests/tasks/cases/<family>.py (CASE) for each new family"
    for name in FAMILIES:
        assert issubclass(get_task(name), TaskFamily) and get_task(name).name == name


def _case_setup(name: str, **model_spec):
    """The family's case: the family, its tokenizer, its raw rows, their features, and its tiny model (random
    init, seed 0, embeddings sized to the tokenizer; `model_spec` overrides ModelSpec fields)."""
    case = family_cases()[name]
    family = get_task(name)(case.spec)
    raw = datasets.Dataset.from_dict(case.raw)
    tokenizer = (case.processor or tokenizer_for)(family, case.raw)
    keep = set(family.kept_raw_columns())
    features = raw.map(family.preprocess(tokenizer), batched=True, with_indices=True,
                       remove_columns=[c for c in raw.column_names if c not in keep])
    torch.manual_seed(0)
    config = dict(case.model.config)
    if hasattr(tokenizer, "vocab_size"):
        config["vocab_size"] = len(tokenizer)  # random init: embeddings sized to the tokenizer
    model = family.build_model(type(case.model)(**{**vars(case.model), "config": config, **model_spec}))
    return family, tokenizer, raw, features, model


def _two_rows(family, tokenizer, model, features) -> dict:
    """The family's collated batch of the first two feature rows (the model's columns only)."""
    columns = family.dataset_columns()
    return family.collator(tokenizer, model)([{k: v for k, v in features[i].items() if k in columns}
                                              for i in range(2)])


@pytest.mark.parametrize("name", FAMILIES)
def test_family_contract(name):
    assert get_task(name).config_errors(family_cases()[name].spec) == []
    family, tokenizer, raw, features, model = _case_setup(name)
    assert len(features) >= len(raw)
    assert sorted(set(features["example_id"])) == list(range(len(raw)))
    model.eval()
    batch = _two_rows(family, tokenizer, model, features)
    inputs, targets = family.split_batch(batch)
    assert set(targets) == set(family.target_names) and not set(targets) & set(inputs)

    with torch.no_grad():
        loss = family.loss(model(**inputs), targets)
        items = family.count_items(targets)
        step = family.eval_step(model, inputs, targets)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert items.shape == (2,) and (items > 0).all()
    torch.testing.assert_close(step.loss, loss)
    torch.testing.assert_close(step.items, items)
    vocab = getattr(model.config, "vocab_size", None)
    for tensor in step.outputs.values():
        assert tensor.shape[0] == 2
        if vocab and "input_ids" in batch:  # small tensors only: never [B, L, vocab] logits
            assert tensor.numel() < 2 * batch["input_ids"].shape[-1] * vocab

    predictions = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in step.outputs.items()}
    records = family.postprocess(predictions, features.select(range(2)))
    assert all(len(values) == 2 for values in records.values())
    metrics = family.compute_metrics(predictions, {k: v.numpy() for k, v in targets.items()}, features.select(range(2)))
    assert set(metrics) >= set(family.metric_names())
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_full_eval_scores_every_family(name):
    """trainer.bf16_full_eval's model (bf16 weights, floating inputs cast to match, SegFormer's pixel_values
    included) scores each family's batch: what the fp32 model gives, to bf16's precision."""
    from trainer_core.precision import bf16_weights

    family, tokenizer, _, features, model = _case_setup(name)
    model.eval()
    batch = _two_rows(family, tokenizer, model, features)
    inputs, targets = family.split_batch(batch)
    with torch.no_grad():
        full = family.eval_step(model, inputs, targets)
        half = family.eval_step(bf16_weights(model), inputs, targets)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(half.loss).all()
    torch.testing.assert_close(half.loss.float(), full.loss.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(half.items, full.items)
    assert set(half.outputs) == set(full.outputs)


@pytest.fixture(scope="module")
def lora_defaults(tmp_path_factory):
    from flows.config import compose

    return compose(["peft=lora", f"paths.root={tmp_path_factory.mktemp('lora')}"]).peft.spec()


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_on_every_family(name, tmp_path, lora_defaults):
    """peft=lora's defaults (all-linear, the task head saved in full) on each family's tiny model: one training step
    reaches the adapters and the head only, the merged final/ model gives what the adapted one gives."""
    from trainer_core import adapters

    family, tokenizer, _, features, base = _case_setup(name, dropout=0.0)
    model = adapters.wrap(base, lora_defaults)
    batch = _two_rows(family, tokenizer, model, features)
    inputs, targets = family.split_batch(batch)
    model.train()
    family.loss(model(**inputs), targets).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained), sorted(trained)
    assert any("lora_" in n for n in trained)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= trained
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # a trained adapter: not LoRA's zero start
        model.eval()
        adapted = family.loss(model(**inputs), targets)
        adapters.save_final(model, tmp_path)
        merged = type(base).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(family.loss(merged(**inputs), targets), adapted, rtol=1e-4, atol=1e-5)
    saved = adapters.trainable_only(model, model.state_dict())  # what a checkpoint holds: adapters and head only
    assert saved and all("lora_" in n or "modules_to_save" in n for n in saved), sorted(saved)



def test_config_errors_name_the_key():
    spec = family_cases()["token_classification"].spec
    errors = get_task("token_classification").config_errors(
        type(spec)(**{**vars(spec), "options": {"label_all_token": True}, "columns": {"label": "ner_tags"}}))
    assert any(e.startswith("task.options.label_all_token:") and "label_all_tokens" in e for e in errors)
    assert any(e.startswith("task.tokens_column:") for e in errors)


def test_first_subtoken_alignment_and_label_all_tokens():
    """A word split into several sub-tokens carries its tag on the first one only (all, with label_all_tokens)."""
    case = family_cases()["token_classification"]
    tokenizer = tokenizer_for(get_task("token_classification")(case.spec), case.raw)
    words, tags = ["Londonbridge", "is", "far"], [3, 0, 0]  # not in the vocabulary: split into pieces
    pieces = tokenizer(words, is_split_into_words=True)
    word_ids = pieces.word_ids()
    assert word_ids.count(0) > 1, "the test needs a word split into several sub-tokens"
    for label_all, expected_first_word in ((False, [3] + [-100] * (word_ids.count(0) - 1)),
                                           (True, [3] * word_ids.count(0))):
        spec = type(case.spec)(**{**vars(case.spec), "options": {"label_all_tokens": label_all}})
        out = get_task("token_classification")(spec).preprocess(tokenizer)({"tokens": [words], "ner_tags": [tags]}, [0])
        labels = np.array(out["labels"][0])
        assert labels[0] == -100 and labels[-1] == -100  # [CLS], [SEP]
        assert labels[[i for i, w in enumerate(word_ids) if w == 0]].tolist() == expected_first_word
        assert labels[[i for i, w in enumerate(word_ids) if w == 1]].tolist() == [0]


def test_family_and_options_are_checked_when_the_config_is_composed():
    from flows.config import compose
    from stages.schema import ConfigError

    with pytest.raises(ConfigError, match=r"task.family='text_clasification': use one of .*text_classification"):
        compose(["task.family=text_clasification"])
    with pytest.raises(ConfigError, match=r"task.options.label_all_token: not an option .*label_all_tokens"):
        compose(["task=conll2003", "model=tiny_bert", "+task.options.label_all_token=true"])
    cfg = compose(["task=conll2003", "model=tiny_bert", "+task.options.label_all_tokens=true"])
    assert cfg.task.spec().options == {"label_all_tokens": True}


def test_training_arguments_a_family_cannot_use_are_refused_by_name():
    from trainer_core.args import TrainingArguments

    (error,) = get_task("text_classification").training_errors(TrainingArguments(predict_with_generate=True))
    assert error.startswith("trainer.predict_with_generate=true: task.family=text_classification does not generate")
    assert get_task("seq2seq").training_errors(TrainingArguments(predict_with_generate=True)) == []
    errors = get_task("image_classification").training_errors(
        TrainingArguments(train_sampling_strategy="group_by_length", neftune_noise_alpha=5.0))
    assert [e.split("=")[0].split(":")[0] for e in errors] == ["trainer.train_sampling_strategy",
                                                              "trainer.neftune_noise_alpha"]
