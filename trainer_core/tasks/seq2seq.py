"""Sequence-to-sequence generation: summarization (cnn_dailymail, xsum) and translation (wmt16).

Raw columns: source and target (task.columns: {source: article, target: highlights}), or one `translation` column
of {lang: text} dicts with task.options.source_lang / target_lang (wmt16's schema).
Features: the tokenizer's ids of source_prefix + source (truncated to max_source_length), `labels` = the target's
ids (truncated to max_target_length; padded with -100 in a batch), `example_id`. One feature per example.
Models: AutoModelForSeq2SeqLM (T5, BART, ...), or an EncoderDecoderModel built from two pretrained encoders when
model.config has `encoder_decoder: true` (bert2bert from MiniLM: conf/model/bert2bert_minilm.yaml).
Evaluation: teacher-forced loss, then `generate` (task.options.predict_with_generate; every rank generates its
own shard with `synced_gpus` so FSDP2 / ZeRO-3 collectives stay in step) -> generated ids [B, T], -100 padded.
Metrics: rouge1/2/L/Lsum, bleu, chrf (trainer_core/metrics/generation.py) and gen_len.
Serves: text -> summary (or translation), with inference params max_new_tokens, num_beams, batch_size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer_core.metrics.generation import TEXT_METRICS, generation_metrics
from trainer_core.tasks import _common
from trainer_core.tasks.base import IGNORE_INDEX, EvalStep, TaskFamily

KINDS = ("summarization", "translation")


@dataclass
class Options:
    source_prefix: str = ""
    """Prepended to every source text (T5: "summarize: ", "translate English to Romanian: ")."""
    max_source_length: int | None = None
    """Source tokens kept (default: task.max_seq_length)."""
    max_target_length: int = 128
    """Target tokens kept for training and scoring."""
    pad_to_multiple_of: int | None = None
    """Pad inputs and labels of a batch to a multiple of this (8 for tensor cores); labels pad with -100."""
    source_lang: str | None = None
    """Translation: key of the source text in the `translation` column's dicts (wmt16 ro-en: "en" or "ro")."""
    target_lang: str | None = None
    kind: str | None = None
    """summarization or translation (names the output column: summary / translation); default: translation when
    the languages are set."""
    predict_with_generate: bool = True
    """Score generated text (generate); false: the teacher-forced argmax (cheap, optimistic). Belongs in the
    trainer group (Seq2SeqTrainingArguments.predict_with_generate) once trainer_core/args.py has it."""
    generation_max_length: int | None = None
    """New tokens generated at evaluation (default: max_target_length)."""
    generation_num_beams: int | None = None
    """Beams at evaluation (default: the model's generation config, 1 = greedy)."""
    generation_config: dict[str, Any] = field(default_factory=dict)
    """More `GenerationConfig` fields for evaluation and serving (no_repeat_ngram_size, length_penalty, ...)."""


def unwrap(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeedEngine wrappers (FSDP2's fully_shard keeps the class)."""
    while hasattr(model, "module") and not hasattr(model, "generate"):
        model = model.module
    return model


def shift_right(labels: Any, decoder_start_token_id: int, pad_token_id: int) -> Any:
    """decoder_input_ids for teacher forcing: the labels moved one to the right behind the start token, -100 -> pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


class Seq2Seq(TaskFamily):
    name = "seq2seq"
    roles = {"source": False, "target": False, "translation": False}
    """source + target, or translation (+ the languages): config_errors asks for one of the two."""
    model_input_names = ("input_ids", "attention_mask")
    Options = Options
    metrics = (*TEXT_METRICS, "gen_len")
    sequence_outputs = ("generated_ids", "labels")
    prediction_key = "generated_ids"
    generates = True
    """Evaluates with `generate` (proposed base attribute, False there: trainer.predict_with_generate is refused
    for families without it)."""

    def __init__(self, spec: Any, **kwargs: Any):
        super().__init__(spec, **kwargs)
        self.tokenizer: Any = None
        """Kept from collator(tokenizer, ...): compute_metrics decodes with it."""

    # --- config --------------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        errors = super().config_errors(spec)
        if any(e.startswith("task.options.") for e in errors):
            return errors  # unknown keys: Options(**) would fail below
        options = Options(**spec.options)
        if cls._is_translation(spec.columns, options):
            if not spec.columns.get("translation"):
                errors.append("task.columns.translation: task.options.source_lang/target_lang are set; name the "
                              "column of {lang: text} dicts (wmt16: translation), or unset the languages.")
            for key in ("source_lang", "target_lang"):
                if not getattr(options, key):
                    errors.append(f"task.options.{key}: a translation column needs both languages (wmt16 ro-en: "
                                  "source_lang=en, target_lang=ro); set it.")
        else:
            for role, example in (("source", "article"), ("target", "highlights")):
                if not spec.columns.get(role):
                    errors.append(f"task.columns.{role}: task.family=seq2seq needs a {role} text column (e.g. "
                                  f"{example}); set it, or task.columns.translation with task.options.source_lang "
                                  "and target_lang.")
        for key in ("max_source_length", "max_target_length", "pad_to_multiple_of", "generation_max_length",
                    "generation_num_beams"):
            value = getattr(options, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                errors.append(f"task.options.{key}={value!r}: must be a positive integer (or null).")
        if options.kind is not None and options.kind not in KINDS:
            errors.append(f"task.options.kind={options.kind!r}: use summarization or translation.")
        return errors

    @classmethod
    def model_errors(cls, model_spec: Any) -> list[str]:
        """Whether the configured model can do seq2seq, without loading weights (a config.json read at most).

        Proposed base-class hook, called by stages/schema.validate with the model group; build_model raises the
        same message meanwhile."""
        config = dict(model_spec.config or {})
        if config.get("encoder_decoder"):
            if model_spec.name_or_path is None:
                return ["model.config.encoder_decoder=true: builds an EncoderDecoderModel from two pretrained "
                        "encoders; set model.name_or_path (or model.package) to their weights."]
            return []
        model_type = config.get("model_type")
        if model_type is None and model_spec.name_or_path is not None:
            path = Path(model_spec.name_or_path) / "config.json"
            if path.is_file():
                import json

                model_type = json.loads(path.read_text()).get("model_type")
        if model_type is None:
            return []  # a Hub id: the Auto class says it at load time
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

        if model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            return [f"model.config: model_type={model_type!r} has no decoder for task.family=seq2seq. Use an "
                    f"encoder-decoder model (t5, bart, ...: model=tiny_t5), or set model.config.encoder_decoder=true "
                    f"to build an EncoderDecoderModel from two {model_type} encoders (model=bert2bert_minilm)."]
        return []

    @staticmethod
    def _is_translation(columns: dict[str, Any], options: Options) -> bool:
        return bool(columns.get("translation") or options.source_lang or options.target_lang)

    @property
    def translation(self) -> bool:
        return self._is_translation(self.spec.columns, self.options)

    @property
    def kind(self) -> str:
        return self.options.kind or ("translation" if self.translation else "summarization")

    @property
    def output_column(self) -> str:
        """What serving and predictions.jsonl call the generated text: summary or translation."""
        return "translation" if self.kind == "translation" else "summary"

    @property
    def max_source_length(self) -> int:
        return self.options.max_source_length or self.spec.max_seq_length

    def sources_targets(self, batch: dict[str, list]) -> tuple[list[str], list[str] | None]:
        """Source and target texts of a batch of raw rows (targets None when the rows have none)."""
        if self.translation:
            pairs = batch[self.column("translation")]
            sources = [str(p[self.options.source_lang]) for p in pairs]
            targets = [str(p[self.options.target_lang]) for p in pairs] if pairs and \
                pairs[0].get(self.options.target_lang) is not None else None
            return sources, targets
        target = self.column("target")
        return ([str(t) for t in batch[self.column("source")]],
                [str(t) for t in batch[target]] if target in batch else None)

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        errors = []
        for split, dataset in raw.items():
            for role in self.roles:
                column = self.column(role)
                if column and column not in dataset.column_names:
                    errors.append(f"task.columns.{role}={column!r}: the {split} split has no such column (columns: "
                                  f"{', '.join(dataset.column_names)}). Set task.columns.{role} to one of them.")
            if self.translation and not errors and len(dataset):
                found = sorted(dataset[0][self.column("translation")])
                for key in ("source_lang", "target_lang"):
                    if getattr(self.options, key) not in found:
                        errors.append(f"task.options.{key}={getattr(self.options, key)!r}: the {split} split's "
                                      f"{self.column('translation')} column has languages {', '.join(found)}.")
        return sorted(set(errors))

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        prefix, max_source, max_target = self.options.source_prefix, self.max_source_length, \
            self.options.max_target_length

        def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            sources, targets = self.sources_targets(batch)
            encoded = tokenizer([prefix + s for s in sources], max_length=max_source, truncation=True,
                                return_token_type_ids=False)
            if targets is not None:
                encoded["labels"] = tokenizer(text_target=targets, max_length=max_target, truncation=True,
                                              return_token_type_ids=False)["input_ids"]
            encoded["example_id"] = indices
            return dict(encoded)

        return tokenize

    def kept_raw_columns(self) -> list[str]:
        if self.translation:
            return [self.column("translation")]
        return [c for c in (self.column("source"), self.column("target")) if c]

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        """Sources and targets (both languages), and the prefix once: the decoder shares the vocabulary."""
        sources, targets = self.sources_targets(raw_split[:])
        return [self.options.source_prefix, *sources, *(targets or [])]

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        """AutoModelForSeq2SeqLM (random init from model.config, or pretrained); with model.config.encoder_decoder
        an EncoderDecoderModel of two copies of the pretrained encoder (the decoder gets cross-attention)."""
        errors = self.model_errors(model_spec)
        if errors:
            raise ValueError(" ".join(errors))
        if dict(model_spec.config or {}).get("encoder_decoder"):
            return self._build_encoder_decoder(model_spec)
        from transformers import AutoModelForSeq2SeqLM

        spec = dataclasses.replace(self.spec, num_labels=2, label_names=[])  # no classes: keep configs clean
        model = _common.build_model(AutoModelForSeq2SeqLM, model_spec, spec)
        # a T5Config built from scratch has no decoder start (released checkpoints set it): T5 starts at pad
        if getattr(model.config, "decoder_start_token_id", None) is None and model.config.pad_token_id is not None:
            model.config.decoder_start_token_id = model.config.pad_token_id
        if getattr(model.generation_config, "decoder_start_token_id", None) is None:
            model.generation_config.decoder_start_token_id = model.config.decoder_start_token_id
        return model

    @staticmethod
    def _build_encoder_decoder(model_spec: Any) -> Any:
        from transformers import AutoTokenizer, EncoderDecoderModel

        path = model_spec.name_or_path
        overrides = {k: v for k, v in model_spec.config.items() if k not in ("encoder_decoder", "vocab_size")}
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, **overrides)
        # BERT-style ids: the decoder starts from [CLS] and stops at [SEP]; generate reads them from here
        tokenizer = AutoTokenizer.from_pretrained(path)
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        for config in (model.config, model.generation_config):
            config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = start, tokenizer.pad_token_id, end
        model.config.vocab_size = model.config.decoder.vocab_size
        if model_spec.dropout is not None:
            for sub in (model.config.encoder, model.config.decoder):
                for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
                    if hasattr(sub, key):
                        setattr(sub, key, model_spec.dropout)
            for module in model.modules():
                if type(module).__name__ == "Dropout":
                    module.p = model_spec.dropout
        return model

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        """Right-pad sources (pad id) and labels (-100) to the batch's longest, rounded up to pad_to_multiple_of;
        decoder_input_ids = labels shifted right behind the decoder start token (an input: split_batch keeps it)."""
        import torch

        self.tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        pad_id, start_id = self._special_ids(model, tokenizer)
        multiple = self.options.pad_to_multiple_of

        def width_of(rows: list[list[int]]) -> int:
            width = max(len(r) for r in rows)
            return -(-width // multiple) * multiple if multiple else width

        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            width = width_of(rows)
            return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            ids = [f["input_ids"] for f in features]
            masks = [f.get("attention_mask") or [1] * len(f["input_ids"]) for f in features]
            batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad(masks, 0)}
            if "labels" in features[0]:
                labels = pad([f["labels"] for f in features], IGNORE_INDEX)
                batch["labels"] = labels
                batch["decoder_input_ids"] = shift_right(labels, start_id, pad_id)
            return batch

        return collate

    @staticmethod
    def _special_ids(model: Any, tokenizer: Any) -> tuple[int, int]:
        """(pad, decoder start) ids: the model's config first (bert2bert starts at [CLS]), then T5's convention
        (the decoder starts at pad)."""
        config = getattr(unwrap(model), "config", None) if model is not None else None
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None) or 0
        start = getattr(config, "decoder_start_token_id", None)
        return pad_id, pad_id if start is None else start

    # --- training ------------------------------------------------------------------------------
    loss_per_example = staticmethod(_common.token_loss_per_example)

    def count_items(self, targets: dict[str, Any]) -> Any:
        return _common.count_label_tokens(targets)

    # --- evaluation ----------------------------------------------------------------------------
    def generation_kwargs(self, model: Any, max_new_tokens: int | None = None, num_beams: int | None = None) -> Any:
        """The model's GenerationConfig with this task's evaluation settings (and a caller's overrides)."""
        import copy

        config = copy.deepcopy(model.generation_config)
        config.update(**self.options.generation_config)
        config.max_new_tokens = max_new_tokens or self.options.generation_max_length or self.options.max_target_length
        config.max_length = None
        if num_beams or self.options.generation_num_beams:
            config.num_beams = num_beams or self.options.generation_num_beams
        for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            if getattr(config, key, None) is None and getattr(model.config, key, None) is not None:
                setattr(config, key, getattr(model.config, key))
        return config

    def generate(self, model: Any, input_ids: Any, attention_mask: Any, **overrides: Any) -> Any:
        """Generated ids [B, T] without the decoder start token, -100 after the end (and on pad).

        Every rank generates its own shard of the evaluation set with the sharded model: `synced_gpus` keeps
        ranks stepping together until all are done (a rank that finished early runs dummy forwards), so the
        all-gathers of FSDP2 / ZeRO-3 match on every rank. Under FSDP2 the root's own parameters (embeddings,
        lm_head) are gathered for the whole call: generate runs the encoder without the root's forward hook (and
        a model sharded but never run forward first goes through the root once)."""
        import contextlib

        import torch
        import torch.distributed as dist

        inner = unwrap(model)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        config = self.generation_kwargs(inner, **overrides)
        unsharded = contextlib.nullcontext()
        if _is_fsdp2_root(inner):
            with torch.no_grad():  # FSDP2 initialises from the root's first forward: one decoder step, not the encoder
                inner(input_ids=input_ids, attention_mask=attention_mask,
                      decoder_input_ids=input_ids.new_full((input_ids.shape[0], 1), config.decoder_start_token_id))
            unsharded = _unsharded(inner)
        with unsharded, torch.no_grad():
            ids = inner.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 synced_gpus=synced)
        ids = ids[:, 1:]  # the decoder start token every encoder-decoder output begins with
        pad = config.pad_token_id
        return ids.masked_fill(ids == pad, IGNORE_INDEX) if pad is not None else ids

    def eval_step(self, model: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> EvalStep:
        """Teacher-forced loss (with targets), then generate (or the teacher-forced argmax): ids [B, T]."""
        loss = items = outputs = None
        if targets:
            outputs = model(**inputs)
            loss, items = self.loss(outputs, targets), self.count_items(targets)
        if self.options.predict_with_generate or outputs is None:
            ids = self.generate(model, inputs["input_ids"], inputs.get("attention_mask"))
        else:
            ids = outputs.logits.argmax(dim=-1).masked_fill(targets["labels"].eq(IGNORE_INDEX), IGNORE_INDEX)
        return EvalStep(loss, items, {"generated_ids": ids})

    def decode(self, ids: Any, tokenizer: Any = None) -> list[str]:
        """Texts of id rows padded with -100 (generated ids or labels)."""
        tokenizer = tokenizer or self._tokenizer_for_metrics(None)
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[:, None]
        ids = np.where(ids == IGNORE_INDEX, tokenizer.pad_token_id, ids).astype(np.int64)
        return [text.strip() for text in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

    def _tokenizer_for_metrics(self, dataset: Any) -> Any:
        """The tokenizer given to collator(); else the one prepare_data saved next to the dataset (<ref>/tokenizer
        beside <ref>/dataset/<split>)."""
        if self.tokenizer is not None:
            return self.tokenizer
        for cache in getattr(dataset, "cache_files", None) or []:
            for parent in Path(cache["filename"]).parents:
                if (parent / "tokenizer" / "tokenizer_config.json").is_file():
                    from transformers import AutoTokenizer

                    self.tokenizer = AutoTokenizer.from_pretrained(str(parent / "tokenizer"))
                    return self.tokenizer
        raise RuntimeError("task.family=seq2seq decodes generated ids with the tokenizer: build the collator with "
                           "family.collator(tokenizer, model) before computing metrics.")

    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Generated ids -> text and its length in tokens, one per example."""
        ids = np.asarray(predictions["generated_ids"])
        tokenizer = self._tokenizer_for_metrics(dataset)
        texts = self.decode(ids, tokenizer)
        return {"prediction": np.array(texts, dtype=object), "gen_len": self.generated_lengths(ids)}

    @staticmethod
    def generated_lengths(ids: np.ndarray) -> np.ndarray:
        """Tokens generated per example, the end token included, padding (-100) not."""
        ids = np.asarray(ids)
        return (ids != IGNORE_INDEX).sum(axis=-1) if ids.ndim > 1 else np.ones(len(ids), dtype=np.int64)

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        """The configured metrics over every example once (the trainer gathered them), texts decoded here."""
        tokenizer = self._tokenizer_for_metrics(dataset)
        ids = np.asarray(predictions["generated_ids"])
        texts = self.decode(ids, tokenizer)
        references = self.decode(np.asarray(targets["labels"]), tokenizer)
        names = self.metric_names()
        results = generation_metrics([n for n in names if n != "gen_len"], texts, references)
        if "gen_len" in names:
            results["gen_len"] = float(self.generated_lengths(ids).mean()) if len(ids) else 0.0
        return {k: float(v) for k, v in results.items()}

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        decoded = self.postprocess(predictions, dataset)
        example_ids = dataset["example_id"][:]  # whole column: see text_classification
        if self.translation:
            pairs = dataset[self.column("translation")]
            sources = [p[self.options.source_lang] for p in pairs]
            truth = [p[self.options.target_lang] for p in pairs]
        else:
            sources = dataset[self.column("source")]
            target = self.column("target")
            truth = dataset[target] if target in dataset.column_names else None
        for i, text in enumerate(decoded["prediction"].tolist()):
            row = {"row_id": example_ids[i], "text": sources[i], self.output_column: text,
                   "gen_len": int(decoded["gen_len"][i])}
            if scored and truth is not None:
                row["reference"] = truth[i]
            yield row

    # --- serving -------------------------------------------------------------------------------
    def input_columns(self) -> list[str]:
        """The served model reads one column of source texts, `text` (the prefix is added for the caller)."""
        return ["text"]

    def serving_meta(self) -> dict[str, Any]:
        meta = super().serving_meta()
        meta.update(kind=self.kind, output_column=self.output_column)
        return meta

    def serving_schema(self) -> dict[str, list]:
        max_new = self.options.generation_max_length or self.options.max_target_length
        return {"inputs": [["string", None]], "outputs": [["string", self.output_column]],
                "params": [["max_new_tokens", "long", int(max_new)],
                           ["num_beams", "long", int(self.options.generation_num_beams or 1)],
                           ["batch_size", "long", 16]]}

    def input_example(self, raw_split: Any) -> Any:
        sources, _ = self.sources_targets(raw_split[:2])
        return sources

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        return AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        params = params or {}
        batch_size = int(params.get("batch_size") or 16)
        overrides = {"max_new_tokens": params.get("max_new_tokens"), "num_beams": params.get("num_beams")}
        overrides = {k: int(v) for k, v in overrides.items() if v is not None}
        texts = [self.options.source_prefix + t for t in frame[self.input_columns()[0]].astype(str).tolist()]
        outputs: list[str] = []
        for start in range(0, len(texts), batch_size):
            encoded = processor(texts[start : start + batch_size], max_length=self.max_source_length,
                                truncation=True, padding=True, return_tensors="pt", return_token_type_ids=False)
            ids = self.generate(model, encoded["input_ids"], encoded["attention_mask"], **overrides)
            outputs += self.decode(ids.numpy(), processor)
        return pd.DataFrame({self.output_column: outputs})


def _is_fsdp2_root(module: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


class _unsharded:
    """Gather an FSDP2 root's own parameters for the duration of a block, reshard after."""

    def __init__(self, module: Any):
        self.module = module

    def __enter__(self) -> None:
        self.module.unshard()

    def __exit__(self, *exc: Any) -> None:
        self.module.reshard()
