"""The seq2seq family on tiny models: config errors, preprocessing, collation, loss, generate, metrics, serving."""

from __future__ import annotations

import dataclasses
import math

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from stages.tokenizers_seq2seq import train_seq2seq_tokenizer
from tests.tasks.cases.seq2seq import CASE, TINY_T5
from trainer_core.spec import ModelSpec, TaskSpec
from trainer_core.tasks import get_task
from trainer_core.tasks.seq2seq import Seq2Seq, shift_right

WMT = TaskSpec(family="seq2seq", columns={"translation": "translation"}, metrics=["bleu", "chrf", "gen_len"],
               options={"source_lang": "en", "target_lang": "ro", "source_prefix": "translate: "})


def spec(**options):
    return dataclasses.replace(CASE.spec, options={**CASE.spec.options, **options})


@pytest.fixture(scope="module")
def tokenizer():
    family = Seq2Seq(CASE.spec)
    return train_seq2seq_tokenizer(family.tokenizer_texts(datasets.Dataset.from_dict(CASE.raw)), vocab_size=300)


@pytest.fixture(scope="module")
def t5(tokenizer):
    torch.manual_seed(0)
    model = Seq2Seq(CASE.spec).build_model(ModelSpec(config={**TINY_T5, "vocab_size": len(tokenizer)}, dropout=0.0))
    return model.eval()


def test_discovered_by_name():
    assert get_task("seq2seq") is Seq2Seq


def test_config_errors_name_the_missing_column_and_bad_options():
    errors = Seq2Seq.config_errors(dataclasses.replace(CASE.spec, columns={"source": "article"}))
    assert [e for e in errors if e.startswith("task.columns.target:")]
    assert not [e for e in errors if e.startswith("task.columns.source:")]
    errors = Seq2Seq.config_errors(dataclasses.replace(WMT, options={"source_lang": "en"}))
    assert any(e.startswith("task.options.target_lang:") for e in errors)
    errors = Seq2Seq.config_errors(spec(max_target_lenght=5))
    assert any(e.startswith("task.options.max_target_lenght:") and "max_target_length" in e for e in errors)
    errors = Seq2Seq.config_errors(spec(pad_to_multiple_of=0, kind="qa"))
    assert any(e.startswith("task.options.pad_to_multiple_of=0") for e in errors)
    assert any(e.startswith("task.options.kind='qa'") for e in errors)
    assert Seq2Seq.config_errors(WMT) == []


def test_model_errors_refuse_an_encoder_only_model():
    bert = ModelSpec(config={"model_type": "bert", "hidden_size": 32})
    (error,) = Seq2Seq.model_errors(bert)
    assert error.startswith("model.config:") and "encoder_decoder=true" in error
    with pytest.raises(ValueError, match="has no decoder"):
        Seq2Seq(CASE.spec).build_model(bert)
    assert Seq2Seq.model_errors(ModelSpec(config=dict(TINY_T5))) == []
    assert Seq2Seq.model_errors(ModelSpec(config={"encoder_decoder": True}))[0].startswith(
        "model.config.encoder_decoder=true")


def test_check_raw_names_the_missing_column_and_languages():
    raw = {"train": datasets.Dataset.from_dict({"article": ["a"], "summary": ["b"]})}
    (error,) = Seq2Seq(CASE.spec).check_raw(raw, ("train",))
    assert error.startswith("task.columns.target='highlights'") and "summary" in error
    wmt = {"train": datasets.Dataset.from_dict({"translation": [{"de": "x", "en": "y"}]})}
    (error,) = Seq2Seq(WMT).check_raw(wmt, ("train",))
    assert error.startswith("task.options.target_lang='ro'") and "de, en" in error


def test_preprocess_prefixes_truncates_and_ends_targets_with_eos(tokenizer):
    family = Seq2Seq(spec(max_source_length=5, max_target_length=3))
    out = family.preprocess(tokenizer)({"article": ["the council approved the new park"],
                                        "highlights": ["council approves new park"]}, [7])
    assert out["example_id"] == [7] and "token_type_ids" not in out
    expected_source = tokenizer("summarize: the council approved the new park")["input_ids"]
    assert len(expected_source) > 5
    assert out["input_ids"][0] == expected_source[:4] + [tokenizer.eos_token_id]  # truncated, </s> kept
    assert len(out["labels"][0]) == 3 and out["labels"][0][-1] == tokenizer.eos_token_id == 1


def test_translation_reads_the_configured_languages(tokenizer):
    family = Seq2Seq(WMT)
    out = family.preprocess(tokenizer)({"translation": [{"ro": "parcul", "en": "park"}]}, [0])
    assert out["input_ids"][0] == tokenizer("translate: park")["input_ids"]
    assert out["labels"][0] == tokenizer("parcul")["input_ids"]
    assert family.output_column == "translation" and Seq2Seq(CASE.spec).output_column == "summary"


def test_collator_pads_labels_with_ignore_index_to_a_multiple(tokenizer, t5):
    family = Seq2Seq(spec(pad_to_multiple_of=4))
    batch = family.collator(tokenizer, t5)([
        {"input_ids": [5, 6, 1], "attention_mask": [1, 1, 1], "labels": [7, 8, 9, 10, 1]},
        {"input_ids": [5, 1], "attention_mask": [1, 1], "labels": [7, 1]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 1, 0], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[7, 8, 9, 10, 1, -100, -100, -100], [7, 1] + [-100] * 6]
    # teacher forcing: the decoder sees start (T5: pad = 0), then the labels one step late, pad for -100
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 8, 9, 10, 1, 0, 0], [0, 7, 1, 0, 0, 0, 0, 0]]
    inputs, targets = family.split_batch(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "decoder_input_ids"} and set(targets) == {"labels"}


def test_shift_right_starts_from_the_given_token():
    assert shift_right(torch.tensor([[4, 5, -100]]), 101, 0).tolist() == [[101, 4, 5]]


def test_loss_sums_token_cross_entropy_and_counts_target_tokens():
    family = Seq2Seq(CASE.spec)
    logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: ln 4 per token
    logits[1, 0, 2] = 100.0  # example 2's first token is certain and right: loss 0
    labels = torch.tensor([[1, 2, -100], [2, 3, 1]])
    loss = Seq2Seq.loss_per_example(logits, labels)
    torch.testing.assert_close(loss, torch.tensor([2 * math.log(4), 2 * math.log(4)]))
    assert family.count_items({"labels": labels}).tolist() == [2, 3]


def test_eval_step_generates_small_ids_without_the_start_token(tokenizer, t5):
    family = Seq2Seq(spec(generation_max_length=3))
    rows = [{"input_ids": tokenizer("the team won")["input_ids"], "labels": tokenizer("team wins")["input_ids"]},
            {"input_ids": tokenizer("a storm")["input_ids"], "labels": tokenizer("storm")["input_ids"]}]
    inputs, targets = family.split_batch(family.collator(tokenizer, t5)(rows))
    step = family.eval_step(t5, inputs, targets)
    ids = step.outputs["generated_ids"]
    assert ids.shape[0] == 2 and ids.shape[1] <= 3 and ids.dtype == torch.long
    expected = t5.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           max_new_tokens=3, do_sample=False)[:, 1:]
    torch.testing.assert_close(ids, expected.masked_fill(expected == 0, -100))
    torch.testing.assert_close(step.items, targets["labels"].ne(-100).sum(1))
    # without generate: the teacher-forced argmax, -100 where the labels are padding
    cheap = Seq2Seq(spec(predict_with_generate=False)).eval_step(t5, inputs, targets).outputs["generated_ids"]
    assert cheap.shape == targets["labels"].shape
    assert (cheap[targets["labels"] == -100] == -100).all()


def test_compute_metrics_decode_ids_and_count_generated_tokens(tokenizer):
    family = Seq2Seq(CASE.spec)
    family.collator(tokenizer)
    good, other = tokenizer("council approves new park")["input_ids"], tokenizer("storm")["input_ids"]
    width = max(len(good), len(other))
    pad = lambda ids: ids + [-100] * (width - len(ids))  # noqa: E731
    predictions = {"generated_ids": np.array([pad(good), pad(other)])}
    targets = {"labels": np.array([pad(good), pad(good)])}
    metrics = family.compute_metrics(predictions, targets)
    assert set(metrics) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "gen_len"}
    assert metrics["rouge1"] == pytest.approx(50.0)  # one exact summary, one with no word in common
    assert metrics["gen_len"] == pytest.approx((len(good) + len(other)) / 2)  # </s> counted, -100 not
    assert family.postprocess(predictions)["prediction"].tolist() == ["council approves new park", "storm"]


def test_compute_metrics_needs_a_tokenizer():
    with pytest.raises(RuntimeError, match="collator"):
        Seq2Seq(CASE.spec).compute_metrics({"generated_ids": np.array([[1]])}, {"labels": np.array([[1]])})


def test_serving_round_trip_respects_max_new_tokens(tokenizer, t5, tmp_path):
    t5.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    family = Seq2Seq(CASE.spec)
    schema = family.serving_schema()
    assert schema["outputs"] == [["string", "summary"]]
    assert [p[0] for p in schema["params"]] == ["max_new_tokens", "num_beams", "batch_size"]
    assert family.input_example(datasets.Dataset.from_dict(CASE.raw)) == CASE.raw["article"][:2]
    model, processor = family.load_for_serving(str(tmp_path))
    frame = family.serve(model, processor, pd.DataFrame({"text": ["the team won the final", "a storm"]}),
                         {"max_new_tokens": 2, "num_beams": 2})
    assert list(frame.columns) == ["summary"] and len(frame) == 2
    # what transformers' own generate gives with those params, decoded without special tokens
    texts = ["summarize: the team won the final", "summarize: a storm"]
    encoded = processor(texts, padding=True, return_tensors="pt")
    expected = model.generate(**encoded, max_new_tokens=2, num_beams=2, do_sample=False)
    assert expected.shape[1] <= 3  # start token + 2 new ones
    assert frame["summary"].tolist() == [t.strip() for t in processor.batch_decode(expected, skip_special_tokens=True)]


def test_bert2bert_from_minilm_starts_at_cls_and_ends_at_sep():
    from tests.tasks.seq2seq_data import minilm_dir

    model = Seq2Seq(CASE.spec).build_model(ModelSpec(name_or_path=minilm_dir(), config={"encoder_decoder": True}))
    assert type(model).__name__ == "EncoderDecoderModel"
    assert (model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id) == (101, 0, 102)
    assert model.config.decoder.is_decoder and model.config.decoder.add_cross_attention
    # the encoder keeps MiniLM's weights; the decoder's cross-attention is new
    torch.testing.assert_close(model.encoder.embeddings.word_embeddings.weight,
                               model.decoder.bert.embeddings.word_embeddings.weight)


def _fsdp2_generate_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: the same tiny T5 sharded with trainer_core.fsdp2 (T5Block units + root) generates this rank's
    texts; rank 1 stops after 2 new tokens, rank 0 after 5, so synced_gpus must keep rank 1 stepping."""
    import copy
    import json
    import os

    import torch.distributed as dist

    from trainer_core.fsdp2 import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    family = Seq2Seq(CASE.spec)
    tokenizer = train_seq2seq_tokenizer(family.tokenizer_texts(datasets.Dataset.from_dict(CASE.raw)), vocab_size=300)
    torch.manual_seed(0)
    model = family.build_model(ModelSpec(config={**TINY_T5, "vocab_size": len(tokenizer)}, dropout=0.0)).eval()
    plain = copy.deepcopy(model)
    shard_model(model, {"fsdp_transformer_layer_cls_to_wrap": "T5Block"}, "cpu")
    texts = [["the team won the final", "a storm"], ["the council approved the new park on Monday"]][rank]
    max_new = [5, 2][rank]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    sharded = family.generate(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=max_new)
    dist.barrier()
    dist.destroy_process_group()
    # the unsharded copy, alone on this rank (no process group: no syncing needed)
    expected = family.generate(plain, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=max_new)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"sharded": sharded.tolist(), "expected": expected.tolist()}, handle)


@pytest.mark.integration  # two spawned ranks: ~45 s on 2 shared cores
def test_fsdp2_ranks_generate_their_shards_in_lockstep(tmp_path):
    import json

    import torch.multiprocessing as mp

    from stages.launch import free_port

    mp.start_processes(_fsdp2_generate_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank, max_new in ((0, 5), (1, 2)):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sharded"] == result["expected"]
        assert len(result["sharded"][0]) <= max_new
