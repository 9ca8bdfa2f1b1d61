"""Causal language modelling (GPT-2, Llama, ...): next-token prediction on blocks of text.

Raw columns: text (one document per row; blank rows, as wikitext's, are skipped).
Features: blocks of `block_size` tokens (task.options.block_size, default task.max_seq_length) cut from the
concatenated documents (each ends with the tokenizer's EOS), `labels` (the input ids, as transformers has them:
the loss shifts them), `example_id` (the document a block starts in). With task.options.packing=true each block
also has `position_ids` restarting at 0 at every document start, the collator gives a block-diagonal causal
attention mask [B, 1, L, L], and a document's first token is no target: no token sees or predicts across a
document boundary, and a packed block's per-token losses equal those of its documents run one by one.
Loss: summed over each block's target tokens; items: its target tokens (labels != -100 after the shift).
Metrics: perplexity = exp(loss per token), accuracy (next-token), and with task.options.generate_eval=true
exact_match and rougeL of greedy continuations (the last max_new_tokens tokens of each block's first document,
generated from what precedes them; ROUGE-L over token ids).
Serves: prompt -> generated_text (the continuation only), with params max_new_tokens, temperature (0: greedy),
num_beams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer_core.tasks import _common, _packing
from trainer_core.tasks.base import IGNORE_INDEX, EvalStep, TaskFamily


@dataclass
class Options:
    block_size: int | None = None
    """Tokens per block (at most the model's maximum positions); None: task.max_seq_length."""
    packing: bool = False
    """Per-document position ids and no attention across documents (else run_clm's plain grouping)."""
    add_eos: bool = True
    """End every document with the tokenizer's EOS token (when it has one), so the model learns to stop."""
    generate_eval: bool = False
    """During evaluation also generate greedy continuations and score them (metrics exact_match, rougeL)."""
    max_new_tokens: int = 16
    """Length of the continuations generate_eval scores."""


GENERATION_METRICS = ("exact_match", "rougeL")


class CausalLM(TaskFamily):
    name = "causal_lm"
    roles = {"text": True}
    Options = Options
    model_input_names = ("input_ids", "attention_mask", "position_ids")
    target_names = ("labels",)
    metrics = ("perplexity", "accuracy", *GENERATION_METRICS)
    prediction_key = "loss_sum"

    @property
    def block_size(self) -> int:
        return self.options.block_size or self.spec.max_seq_length

    # --- config --------------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, spec: Any) -> list[str]:
        errors = super().config_errors(spec)
        if errors:
            return errors
        options = cls.Options(**spec.options)
        if options.block_size is not None and options.block_size < 2:
            errors.append(f"task.options.block_size={options.block_size}: a block needs at least 2 tokens (an input "
                          "and its next token); use e.g. 128.")
        if options.max_new_tokens < 1:
            errors.append(f"task.options.max_new_tokens={options.max_new_tokens}: must be >= 1.")
        wanted = [m for m in spec.metrics if m in GENERATION_METRICS]
        if wanted and not options.generate_eval:
            errors.append(f"task.metrics: {', '.join(wanted)} score generated continuations; set "
                          "task.options.generate_eval=true, or drop them from task.metrics.")
        return errors

    def model_errors(self, model_config: Any) -> list[str]:
        """Problems of this task with the model's config (transformers PretrainedConfig), naming the key."""
        model_config = _common.as_model_config(model_config)  # a ModelSpec (preflight) or a config
        if model_config is None:
            return []
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        errors, model_type = [], model_config.model_type
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            errors.append(f"model: a {model_type} model has no causal-LM head (AutoModelForCausalLM); "
                          "task.family=causal_lm needs a decoder such as gpt2 or llama.")
        elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
            # bert & co. have a causal-LM class, but as encoders they attend both ways
            errors.append(f"model: {model_type} is an encoder (bidirectional attention): task.family=causal_lm "
                          "needs a decoder such as gpt2 or llama (or set model.config.is_decoder=true); for "
                          f"{model_type} use task.family=masked_lm.")
        limit = getattr(model_config, "max_position_embeddings", None)
        return errors + _packing.block_size_errors(self.block_size, bool(self.options.block_size), limit)

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        return super().check_raw(raw, scored_splits) or _packing.empty_split_errors(raw, self.column("text"))

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        column, block_size, packing = self.column("text"), self.block_size, self.options.packing
        eos = [tokenizer.eos_token_id] if self.options.add_eos and tokenizer.eos_token_id is not None else []

        def blocks(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            keep = _packing.non_empty(batch[column])
            encoded = tokenizer([str(batch[column][i]) for i in keep], add_special_tokens=False)["input_ids"]
            out = _packing.make_blocks([ids + eos for ids in encoded], [indices[i] for i in keep], block_size, packing)
            out["labels"] = [list(ids) for ids in out["input_ids"]]
            if packing:  # a document's first token is predicted by no one: the token before it is another's
                out["labels"] = [[IGNORE_INDEX if p == 0 else t for t, p in zip(ids, pos, strict=True)]
                                 for ids, pos in zip(out["input_ids"], out["position_ids"], strict=True)]
            return out

        return blocks

    def kept_raw_columns(self) -> list[str]:
        return []  # a block is cut from several documents: no raw column lines up with it

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        column = self.column("text")
        return [str(raw_split[column][i]) for i in _packing.non_empty(raw_split[column])]

    def input_columns(self) -> list[str]:
        return ["prompt"]

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return _common.build_model(AutoModelForCausalLM, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        """Right-pads blocks (labels with -100); with packing, position ids and the block-diagonal causal mask."""
        import torch

        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None) or 0
        self._pad_token_id = pad_id
        # flash attention reads documents from position_ids (varlen) and takes no 4D mask
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
        four_d = self.options.packing and not attention.startswith("flash")
        # eager attention adds the mask to the scores: it takes 0 / -inf (finite min), sdpa takes the bool mask
        additive_dtype = getattr(model, "dtype", torch.float32) if attention == "eager" else None

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            input_ids = _packing.pad_rows([f["input_ids"] for f in features], pad_id)
            labels = [f["labels"] if "labels" in f else f["input_ids"] for f in features]
            batch = {"input_ids": input_ids, "labels": _packing.pad_rows(labels, IGNORE_INDEX)}
            if "position_ids" in features[0]:
                # padding counts on from the last position, so it never looks like a document start
                positions = [list(f["position_ids"]) + list(range(f["position_ids"][-1] + 1,
                             f["position_ids"][-1] + 1 + input_ids.shape[1] - len(f["position_ids"])))
                             for f in features]
                batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
            if four_d and "position_ids" in batch:
                mask = _packing.packed_causal_mask(batch["position_ids"], lengths)
                if additive_dtype is not None:
                    mask = torch.zeros(mask.shape, dtype=additive_dtype).masked_fill(
                        ~mask, torch.finfo(additive_dtype).min)
                batch["attention_mask"] = mask
            else:
                batch["attention_mask"] = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
            return batch

        return collate

    # --- training ------------------------------------------------------------------------------
    @staticmethod
    def loss_per_example(logits: Any, labels: Any, label_smoothing: float = 0.0) -> Any:
        """Cross-entropy of each next-token prediction, summed over a block's targets (logits[t] predicts
        labels[t + 1])."""
        import torch.nn.functional as F

        per_token = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels[:, 1:].long(), reduction="none",
            ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
        )
        return per_token.sum(dim=1)

    def count_items(self, targets: dict[str, Any]) -> Any:
        return targets["labels"][:, 1:].ne(IGNORE_INDEX).sum(dim=1)

    # --- evaluation ----------------------------------------------------------------------------
    def eval_step(self, model: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> EvalStep:
        if not targets:  # the labels are the inputs: a split without targets is scored all the same
            targets = {"labels": inputs["input_ids"]}
        outputs = model(**inputs)
        loss, items = self.loss(outputs, targets), self.count_items(targets)
        labels = targets["labels"][:, 1:]
        hits = outputs.logits[:, :-1].argmax(dim=-1).eq(labels) & labels.ne(IGNORE_INDEX)
        small = {"loss_sum": loss.detach().float(), "tokens": items, "correct": hits.sum(dim=1)}
        if self.options.generate_eval:
            small.update(self._generate_continuations(model, inputs))
        return EvalStep(loss, items, small)

    def _generate_continuations(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Greedy continuation of each block's first document: the last max_new_tokens tokens (at most half of
        the document) are the reference, what precedes them the prompt. Both [B, max_new_tokens], -100 padded."""
        import torch

        model = getattr(model, "module", model)  # DDP wraps; generate lives on the model itself
        width = self.options.max_new_tokens
        ids, positions = inputs["input_ids"], inputs.get("position_ids")
        mask = inputs["attention_mask"]
        if mask.dim() == 4:  # the tokens that see the block's first token: its first document
            first_document = (mask[:, 0, :, 0] == (True if mask.dtype == torch.bool else 0)).sum(dim=1)
        prompts, references = [], []
        for row in range(ids.shape[0]):
            n = int(first_document[row] if mask.dim() == 4 else mask[row].sum())
            if positions is not None and mask.dim() == 2:  # the first document ends where positions restart
                starts = (positions[row, 1:n] == 0).nonzero()
                n = int(starts[0]) + 1 if len(starts) else n
            ref_len = max(1, min(width, n // 2))
            prompts.append(ids[row, : n - ref_len].tolist())
            references.append(ids[row, n - ref_len : n].tolist())
        pad_id = getattr(self, "_pad_token_id", None)
        if pad_id is None:
            pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        generated = _generate(model, prompts, width, pad_id, {"do_sample": False, "num_beams": 1},
                              synced_gpus=_distributed())
        out = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long, device=ids.device)
        ref = torch.full_like(out, IGNORE_INDEX)
        for row, (tokens, reference) in enumerate(zip(generated, references, strict=True)):
            tokens = tokens[: len(reference)]
            out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            ref[row, : len(reference)] = torch.tensor(reference, dtype=torch.long)
        return {"generated": out, "reference": ref}

    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """One record per block: its target tokens, mean loss per token and perplexity."""
        tokens = np.asarray(predictions["tokens"], dtype=np.float64)
        loss = np.asarray(predictions["loss_sum"], dtype=np.float64) / np.maximum(tokens, 1.0)
        return {"tokens": tokens.astype(np.int64), "loss": loss, "perplexity": np.exp(np.minimum(loss, 700.0))}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        _, ppl = _packing.perplexity(predictions)
        metrics = {"perplexity": ppl}
        if "accuracy" in self.spec.metrics:
            metrics["accuracy"] = _packing.token_accuracy(predictions)
        if "generated" in predictions:
            pairs = [(_packing.valid(g), _packing.valid(r))
                     for g, r in zip(predictions["generated"], predictions["reference"], strict=True)]
            if "exact_match" in self.spec.metrics:
                metrics["exact_match"] = float(np.mean([g == r for g, r in pairs])) if pairs else 0.0
            if "rougeL" in self.spec.metrics:
                metrics["rougeL"] = float(np.mean([_packing.rouge_l(g, r) for g, r in pairs])) if pairs else 0.0
        return metrics

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        records = self.postprocess(predictions, dataset)
        example_ids = dataset["example_id"][:]  # whole column: see text_classification
        for i in range(len(records["tokens"])):
            row = {"row_id": i, "example_id": example_ids[i], "tokens": int(records["tokens"][i]),
                   "loss": round(float(records["loss"][i]), 6), "perplexity": round(float(records["perplexity"][i]), 4)}
            if "generated" in predictions:
                row["generated_ids"] = _packing.valid(predictions["generated"][i])
                row["reference_ids"] = _packing.valid(predictions["reference"][i])
            yield row

    # --- serving -------------------------------------------------------------------------------
    def serving_schema(self) -> dict[str, list]:
        return {"inputs": [["string", None]], "outputs": [["string", "generated_text"]],
                "params": [["max_new_tokens", "long", 32], ["temperature", "double", 0.0], ["num_beams", "long", 1]]}

    def input_example(self, raw_split: Any) -> Any:
        column = self.column("text")
        if raw_split is not None and column in getattr(raw_split, "column_names", []):
            texts = [str(raw_split[column][i]) for i in _packing.non_empty(raw_split[column][:50])][:2]
            if len(texts) == 2:
                return [" ".join(text.split()[:8]) for text in texts]
        return ["The history of the", "In the beginning"]  # features hold token ids only

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        params = dict(params or {})
        max_new_tokens, num_beams = int(params.get("max_new_tokens", 32)), int(params.get("num_beams", 1))
        temperature = float(params.get("temperature", 0.0))
        if max_new_tokens < 1 or num_beams < 1 or temperature < 0:
            raise ValueError(f"params: max_new_tokens={max_new_tokens} and num_beams={num_beams} must be >= 1, "
                             f"temperature={temperature} >= 0 (0 = greedy).")
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        prompts = []
        for text in frame[self.input_columns()[0]].astype(str).tolist():
            ids = processor(text, add_special_tokens=False)["input_ids"]
            # keep the end of a long prompt: the continuation depends on it
            prompts.append(ids[-max(1, limit - max_new_tokens):] or [processor.eos_token_id or 0])
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else (processor.eos_token_id or 0)
        generated = _generate(model, prompts, max_new_tokens, pad_id, {**sampling, "num_beams": num_beams},
                              eos_token_id=processor.eos_token_id)
        return pd.DataFrame({"generated_text": [processor.decode(g, skip_special_tokens=True) for g in generated]})


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _generate(model: Any, prompts: list[list[int]], max_new_tokens: int, pad_id: int, options: dict[str, Any],
              eos_token_id: int | None = None, synced_gpus: bool = False) -> list[list[int]]:
    """New tokens of each prompt, generated one prompt at a time: a left-padded batch would shift the absolute
    positions of GPT-2-style models, and per prompt no padding enters the attention.

    synced_gpus (evaluation on several ranks): every rank has as many prompts (Accelerate pads the last batch),
    and each forward of a sharded model (FSDP2, ZeRO-3) all-gathers its parameters, so a rank whose continuation
    ended early keeps stepping until every rank is done (tests/distributed/test_generation.py). no_grad rather
    than inference_mode, as a precaution: inference tensors made while a sharded model all-gathers must not leak
    into the training step that follows an evaluation."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
            result = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    min_new_tokens=1, pad_token_id=pad_id, eos_token_id=eos_token_id,
                                    synced_gpus=synced_gpus, **options)
            out.append(result[0, ids.shape[1]:].tolist())
    return out
