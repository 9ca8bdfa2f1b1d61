"""causal_lm: blocks, packing (per-document positions, no attention across documents), the per-token loss,
perplexity, generation metrics, bad input and serving, on a tiny random GPT-2 and a BPE trained here."""

from __future__ import annotations

import dataclasses
import math

import datasets
import numpy as np
import pytest
import torch

from stages.tokenizers import train_bpe
from tests.tasks.cases.causal_lm import TINY_GPT2
from tests.tasks.lm_data import documents
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks import _packing
from trainer_core.tasks.base import IGNORE_INDEX
from trainer_core.tasks.causal_lm import CausalLM


def spec(**options) -> TaskSpec:
    return TaskSpec(family="causal_lm", columns={"text": "text"}, num_labels=1, metrics=["perplexity"],
                    max_seq_length=32, options=options)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(documents(40), vocab_size=300)


def tiny_model(tokenizer, **config):
    torch.manual_seed(0)
    model = CausalLM(spec()).build_model(ModelSpec(config={**TINY_GPT2, "vocab_size": len(tokenizer), **config},
                                                   dropout=0.0))
    return model.eval()


def test_grouping_and_packing_cut_the_same_stream():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    grouped = _packing.make_blocks(docs, [0, 1, 2], block_size=4, packing=False)
    assert grouped["input_ids"] == [[5, 6, 7, 8], [9, 10, 11, 12], [13]]
    assert grouped["example_id"] == [0, 1, 2]  # the document each block starts in
    assert "position_ids" not in grouped
    packed = _packing.make_blocks(docs, [0, 1, 2], block_size=4, packing=True)
    assert packed["input_ids"] == grouped["input_ids"]
    # restart at each document start and at each block start (doc 1 goes on in block 2 as a new document)
    assert packed["position_ids"] == [[0, 1, 2, 0], [0, 0, 1, 2], [0]]


def test_preprocess_skips_blank_rows_adds_eos_and_masks_document_starts(tokenizer):
    family = CausalLM(spec(block_size=64, packing=True))
    texts = ["", "the cat sees the bridge", "   ", "a dog"]
    out = family.preprocess(tokenizer)({"text": texts}, [10, 11, 12, 13])
    cat = tokenizer("the cat sees the bridge", add_special_tokens=False)["input_ids"]
    dog = tokenizer("a dog", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert out["input_ids"] == [cat + [eos] + dog + [eos]]
    assert out["example_id"] == [11]
    assert out["position_ids"] == [list(range(len(cat) + 1)) + list(range(len(dog) + 1))]
    # the dog's first token has no target: what precedes it is the cat's document (the block's first, none)
    expected = [IGNORE_INDEX] + cat[1:] + [eos] + [IGNORE_INDEX] + dog[1:] + [eos]
    assert out["labels"] == [expected]


def test_packed_block_losses_equal_documents_run_one_by_one(tokenizer):
    """The must-show: per-token losses of a packed block == those of its documents alone (atol 1e-5)."""
    model = tiny_model(tokenizer)
    family = CausalLM(spec(block_size=64, packing=True))
    texts = ["the cat sees the bridge at dawn .", "a dog follows the market .", "my sister paints a red house ."]
    block = family.preprocess(tokenizer)({"text": texts}, [0, 1, 2])
    batch = family.collator(tokenizer, model)([{k: block[k][0] for k in ("input_ids", "position_ids", "labels")}])
    assert batch["attention_mask"].shape == (1, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    with torch.no_grad():
        logits = model(**family.split_batch(batch)[0]).logits[0]
        packed = torch.nn.functional.cross_entropy(logits[:-1], batch["labels"][0, 1:], reduction="none",
                                                   ignore_index=IGNORE_INDEX)
        alone = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([ids])
            doc_logits = model(input_ids=ids).logits[0]
            alone.append(torch.nn.functional.cross_entropy(doc_logits[:-1], ids[0, 1:], reduction="none"))
    targets = batch["labels"][0, 1:] != IGNORE_INDEX
    torch.testing.assert_close(packed[targets], torch.cat(alone), atol=1e-5, rtol=0)
    assert int(targets.sum()) == sum(len(a) for a in alone)  # items: every document's own next tokens


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_token_attends_across_a_document_boundary(tokenizer, attention):
    """Changing the first document leaves every logit of the second unchanged (and the reverse is causal)."""
    model = tiny_model(tokenizer, attn_implementation=attention)
    family = CausalLM(spec(block_size=64, packing=True))
    collate = family.collator(tokenizer, model)

    def logits(first: str) -> torch.Tensor:
        block = family.preprocess(tokenizer)({"text": [first, "a dog follows the market ."]}, [0, 1])
        with torch.no_grad():
            batch = collate([{k: block[k][0] for k in ("input_ids", "position_ids", "labels")}])
            return model(**family.split_batch(batch)[0]).logits[0], block["position_ids"][0]

    a, positions = logits("the cat sees the bridge")
    b, _ = logits("my sister remembers the quiet garden")  # same token count is not needed: compare the tails
    second = len(positions) - positions[::-1].index(0)  # start of the last document
    tail = len(positions) - second
    torch.testing.assert_close(a[-tail:], b[-tail:], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:2], b[:2])


def test_loss_per_example_is_the_token_sum_of_transformers_mean_loss(tokenizer):
    model = tiny_model(tokenizer)
    family = CausalLM(spec(block_size=12))
    features = family.preprocess(tokenizer)({"text": documents(4, seed=3)}, [0, 1, 2, 3])
    rows = [{"input_ids": features["input_ids"][i], "labels": features["labels"][i]} for i in (0, 1)]
    batch = family.collator(tokenizer, model)(rows)
    inputs, targets = family.split_batch(batch)
    with torch.no_grad():
        outputs = model(**inputs)
        loss, items = family.loss(outputs, targets), family.count_items(targets)
        for row in range(2):
            reference = model(input_ids=inputs["input_ids"][row : row + 1], labels=targets["labels"][row : row + 1])
            torch.testing.assert_close(loss[row] / items[row], reference.loss, atol=1e-5, rtol=1e-5)
    assert items.tolist() == [11, 11]  # 12 tokens, 11 next-token targets each


def test_collator_pads_with_ignore_index_and_uses_no_randomness(tokenizer):
    family = CausalLM(spec(packing=True))
    collate = family.collator(tokenizer, None)
    state = torch.random.get_rng_state()
    batch = collate([{"input_ids": [5, 6, 7], "position_ids": [0, 1, 0], "labels": [5, 6, -100]},
                     {"input_ids": [8], "position_ids": [0], "labels": [8]}])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert batch["labels"].tolist() == [[5, 6, -100], [8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2]]  # padding never starts a document
    mask = batch["attention_mask"][:, 0]
    assert mask[0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert mask[1, 0].tolist() == [True, False, False] and not mask[1, 1:, 0].any()  # padding sees no real token


def test_perplexity_is_exp_of_the_token_weighted_loss():
    family = CausalLM(spec())
    predictions = {"loss_sum": np.array([2.0, 4.0]), "tokens": np.array([1, 3]), "correct": np.array([1, 1])}
    metrics = family.compute_metrics(predictions, {})
    assert metrics["perplexity"] == pytest.approx(math.exp(6.0 / 4), rel=1e-12)  # not the mean of 2.0 and 4/3
    spec_acc = dataclasses.replace(spec(), metrics=["perplexity", "accuracy"])
    assert CausalLM(spec_acc).compute_metrics(predictions, {})["accuracy"] == pytest.approx(0.5)


def test_rouge_l_and_exact_match_of_continuations():
    assert _packing.rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # LCS 1 3 4: P = R = 3/4
    assert _packing.rouge_l([1, 2], [3, 4]) == 0.0
    family = CausalLM(dataclasses.replace(spec(generate_eval=True, max_new_tokens=3),
                                          metrics=["perplexity", "exact_match", "rougeL"]))
    predictions = {"loss_sum": np.array([1.0, 1.0]), "tokens": np.array([1, 1]),
                   "generated": np.array([[7, 8, 9], [7, 8, -100]]), "reference": np.array([[7, 8, 9], [8, 7, -100]])}
    metrics = family.compute_metrics(predictions, {})
    assert metrics["exact_match"] == 0.5
    assert metrics["rougeL"] == pytest.approx((1.0 + 0.5) / 2)  # second: LCS 1 of 2 and 2


def test_generate_eval_scores_the_end_of_the_first_document(tokenizer):
    model = tiny_model(tokenizer)
    family = CausalLM(dataclasses.replace(spec(block_size=64, packing=True, generate_eval=True, max_new_tokens=3),
                                          metrics=["perplexity", "exact_match"]))
    texts = ["the cat sees the bridge at dawn .", "a dog follows the market ."]
    block = family.preprocess(tokenizer)({"text": texts}, [0, 1])
    batch = family.collator(tokenizer, model)([{k: block[k][0] for k in ("input_ids", "position_ids", "labels")}])
    with torch.no_grad():
        step = family.eval_step(model, *family.split_batch(batch))
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert step.outputs["reference"][0].tolist() == first[-3:]
    greedy = model.generate(torch.tensor([first[:-3]]), max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert step.outputs["generated"][0].tolist() == greedy[0, -3:].tolist()


def test_model_errors_name_the_key():
    from transformers import AutoConfig

    family = CausalLM(spec(block_size=256))
    gpt2 = AutoConfig.for_model("gpt2", n_positions=128)
    assert family.model_errors(gpt2) == [
        "task.options.block_size=256: the model has 128 positions; set task.options.block_size <= 128."]
    assert CausalLM(spec(block_size=128)).model_errors(gpt2) == []
    bert = CausalLM(spec()).model_errors(AutoConfig.for_model("bert"))
    assert len(bert) == 1 and bert[0].startswith("model: bert is an encoder") and "masked_lm" in bert[0]
    assert CausalLM(spec()).model_errors(AutoConfig.for_model("t5"))[0].startswith("model: a t5 model has no")


def test_config_and_raw_errors_name_the_key():
    errors = CausalLM.config_errors(dataclasses.replace(spec(block_size=1), metrics=["perplexity", "rougeL"]))
    assert any(e.startswith("task.options.block_size=1:") for e in errors)
    assert any(e.startswith("task.metrics: rougeL") and "generate_eval=true" in e for e in errors)
    assert CausalLM.config_errors(spec(pack=True))[0].startswith("task.options.pack: not an option")
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", ""]}),
                                "validation": datasets.Dataset.from_dict({"text": ["", "  \n"]})})
    assert CausalLM(spec()).check_raw(raw, ("train", "validation")) == [
        "task.text_column='text': the validation split has no document with text (2 rows, all empty): "
        "check task.dataset / task.subset."]


def test_serve_continues_prompts_with_declared_params(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    family = CausalLM(spec())
    names = [name for name, _, _ in family.serving_schema()["params"]]
    assert names == ["max_new_tokens", "temperature", "num_beams"]
    served, processor = family.load_for_serving(str(tmp_path))
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["the cat sees", "a dog"]})
    out = family.serve(served, processor, frame, {"max_new_tokens": 4})
    assert list(out.columns) == ["generated_text"] and len(out) == 2
    ids = processor("the cat sees", add_special_tokens=False)["input_ids"]
    greedy = served.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=1,
                             eos_token_id=tokenizer.eos_token_id)
    assert out["generated_text"][0] == processor.decode(greedy[0, len(ids):], skip_special_tokens=True)
    beams = family.serve(served, processor, frame, {"max_new_tokens": 4, "num_beams": 2})
    assert len(beams) == 2
    with pytest.raises(ValueError, match="temperature"):
        family.serve(served, processor, frame, {"temperature": -1.0})
