"""Masked language modelling (BERT, RoBERTa, ...): predict masked tokens of blocks of text (domain adaptation).

Raw columns: text (one document per row; blank rows are skipped).
Features: blocks of `block_size` tokens (task.options.block_size, default task.max_seq_length, special tokens
included) cut from the concatenated documents (each ending in the tokenizer's [SEP]), each wrapped as
[CLS] ... [SEP]; `word_starts` (1 where a word begins; read by whole-word masking); `example_id` (the document a
block starts in). No labels on disk: the collator masks anew at every batch, as DataCollatorForLanguageModeling
does: each token (each word, with task.options.whole_word_masking=true) is chosen with probability
mlm_probability, at least one per block; a chosen token becomes [MASK] 80 % of the time, a random token 10 %,
stays 10 %. Every draw comes from torch's global RNG, so a run resumed with its RNG state masks identically.
Loss: summed over each block's masked tokens; items: its masked tokens.
Metrics: perplexity = exp(loss per masked token), accuracy of the masked-token predictions.
Serves: text with one or more mask tokens ([MASK] or <mask>, whichever the tokenizer uses; both are accepted)
-> top_k rows per mask (param top_k): input_row, mask (which mask of the text), rank, token, token_id, score,
sequence (the text with that mask filled in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer_core.tasks import _common, _packing
from trainer_core.tasks.base import IGNORE_INDEX, EvalStep, TaskFamily

MASK_MARKERS = ("[MASK]", "<mask>")
"""How a served text marks the position to fill, whatever the model's tokenizer calls its mask token."""


@dataclass
class Options:
    block_size: int | None = None
    """Tokens per block with [CLS] and [SEP] (at most the model's maximum positions); None: task.max_seq_length."""
    mlm_probability: float = 0.15
    """Share of tokens (of words, with whole_word_masking) chosen for prediction."""
    whole_word_masking: bool = False
    """Choose whole words: all sub-tokens of a chosen word are masked together."""


class MaskedLM(TaskFamily):
    name = "masked_lm"
    roles = {"text": True}
    Options = Options
    model_input_names = ("input_ids", "attention_mask")
    target_names = ("labels",)
    metrics = ("perplexity", "accuracy")
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
        if not 0.0 < options.mlm_probability < 1.0:
            errors.append(f"task.options.mlm_probability={options.mlm_probability}: must be within (0, 1); "
                          "BERT used 0.15.")
        if options.block_size is not None and options.block_size < 3:
            errors.append(f"task.options.block_size={options.block_size}: a block needs [CLS], a token and [SEP]; "
                          "use e.g. 128.")
        return errors

    def model_errors(self, model_config: Any) -> list[str]:
        """Problems of this task with the model's config (transformers PretrainedConfig), naming the key."""
        model_config = _common.as_model_config(model_config)  # a ModelSpec (preflight) or a config
        if model_config is None:
            return []
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        errors, model_type = [], model_config.model_type
        if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            errors.append(f"model: a {model_type} model has no masked-LM head (AutoModelForMaskedLM); "
                          "task.family=masked_lm needs an encoder such as bert or roberta (for decoders such as "
                          f"{model_type} use task.family=causal_lm).")
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None and model_type in ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"):
            limit -= 2  # RoBERTa's positions start after its padding index
        return errors + _packing.block_size_errors(self.block_size, bool(self.options.block_size), limit)

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        return super().check_raw(raw, scored_splits) or _packing.empty_split_errors(raw, self.column("text"))

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        column = self.column("text")
        head, tail = _wrapping(tokenizer)
        inner = self.block_size - len(head) - len(tail)

        def blocks(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            keep = _packing.non_empty(batch[column])
            encoded = tokenizer([str(batch[column][i]) for i in keep], add_special_tokens=False)
            token_lists, starts = [], []
            for i, ids in enumerate(encoded["input_ids"]):
                words = encoded.word_ids(i)
                # documents apart as BERT's pairs are: [SEP] between them (the last one gets its [SEP] below)
                separator = tail if i + 1 < len(keep) else []
                starts.append([int(w is not None and (j == 0 or words[j - 1] != w)) for j, w in enumerate(words)]
                              + [0] * len(separator))
                token_lists.append(ids + separator)
            out = _packing.make_blocks(token_lists, [indices[i] for i in keep], inner, packing=False,
                                       extras={"word_starts": starts})
            for i, ids in enumerate(out["input_ids"]):
                ends = len(ids) - len(tail) if tail and len(ids) > len(tail) and ids[-len(tail):] == tail else len(ids)
                out["input_ids"][i] = head + ids[:ends] + tail  # a block ending on [SEP] gets no second one
                out["word_starts"][i] = [0] * len(head) + out["word_starts"][i][:ends] + [0] * len(tail)
            return out

        return blocks

    def kept_raw_columns(self) -> list[str]:
        return []  # a block is cut from several documents: no raw column lines up with it

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        column = self.column("text")
        return [str(raw_split[column][i]) for i in _packing.non_empty(raw_split[column])]

    def dataset_columns(self) -> tuple[str, ...]:
        return (*self.model_input_names, *self.target_names, "word_starts")

    def input_columns(self) -> list[str]:
        return ["text"]

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: Any) -> Any:
        from transformers import AutoModelForMaskedLM

        return _common.build_model(AutoModelForMaskedLM, model_spec, self.spec)

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        """Pads blocks and masks them (labels: the original ids of the masked tokens, -100 elsewhere)."""
        import torch

        if tokenizer is None or tokenizer.mask_token_id is None:
            raise ValueError("model.tokenizer: task.family=masked_lm needs a tokenizer with a mask token "
                             "(wordpiece, bpe, or a pretrained encoder's).")
        mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id or 0
        vocab_size = len(tokenizer)
        special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        probability, whole_word = self.options.mlm_probability, self.options.whole_word_masking

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            input_ids = _packing.pad_rows([f["input_ids"] for f in features], pad_id)
            attention = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
            eligible = attention.bool() & ~torch.isin(input_ids, special_ids)
            starts = None
            if whole_word:
                starts = _packing.pad_rows([f.get("word_starts") or [1] * len(f["input_ids"]) for f in features], 0)
            chosen = mask_tokens(eligible, probability, starts)
            labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
            # 80 % [MASK], 10 % a random token, 10 % unchanged (BERT; DataCollatorForLanguageModeling)
            to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8)).bool() & chosen
            to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5)).bool() & chosen & ~to_mask
            random_ids = torch.randint(vocab_size, input_ids.shape, dtype=torch.long)
            masked = input_ids.masked_fill(to_mask, mask_id)
            masked = torch.where(to_random, random_ids, masked)
            return {"input_ids": masked, "attention_mask": attention, "labels": labels}

        return collate

    # --- training ------------------------------------------------------------------------------
    loss_per_example = staticmethod(_common.token_loss_per_example)

    def count_items(self, targets: dict[str, Any]) -> Any:
        return _common.count_label_tokens(targets)

    # --- evaluation ----------------------------------------------------------------------------
    def eval_step(self, model: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> EvalStep:
        outputs = model(**inputs)
        loss, items = self.loss(outputs, targets), self.count_items(targets)
        labels = targets["labels"]
        hits = outputs.logits.argmax(dim=-1).eq(labels) & labels.ne(IGNORE_INDEX)
        return EvalStep(loss, items, {"loss_sum": loss.detach().float(), "tokens": items, "correct": hits.sum(dim=1)})

    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """One record per block: its masked tokens, mean loss per masked token, share predicted right."""
        tokens = np.asarray(predictions["tokens"], dtype=np.float64)
        loss = np.asarray(predictions["loss_sum"], dtype=np.float64) / np.maximum(tokens, 1.0)
        accuracy = np.asarray(predictions["correct"], dtype=np.float64) / np.maximum(tokens, 1.0)
        return {"tokens": tokens.astype(np.int64), "loss": loss, "accuracy": accuracy}

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        _, ppl = _packing.perplexity(predictions)
        metrics = {"perplexity": ppl}
        if "accuracy" in self.spec.metrics:
            metrics["accuracy"] = _packing.token_accuracy(predictions)
        return metrics

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        records = self.postprocess(predictions, dataset)
        example_ids = dataset["example_id"][:]  # whole column: see text_classification
        for i in range(len(records["tokens"])):
            yield {"row_id": i, "example_id": example_ids[i], "masked_tokens": int(records["tokens"][i]),
                   "loss": round(float(records["loss"][i]), 6), "accuracy": round(float(records["accuracy"][i]), 6)}

    # --- serving -------------------------------------------------------------------------------
    def serving_schema(self) -> dict[str, list]:
        return {"inputs": [["string", None]],
                "outputs": [["long", "input_row"], ["long", "mask"], ["long", "rank"], ["string", "token"],
                            ["long", "token_id"], ["double", "score"], ["string", "sequence"]],
                "params": [["top_k", "long", 5]]}

    def input_example(self, raw_split: Any) -> Any:
        column = self.column("text")
        if raw_split is not None and column in getattr(raw_split, "column_names", []):
            texts = [str(raw_split[column][i]).split() for i in _packing.non_empty(raw_split[column][:50])]
            texts = [words[:8] for words in texts if len(words) >= 3][:2]
            if len(texts) == 2:
                return [" ".join([*words[:2], "[MASK]", *words[3:]]) for words in texts]
        return ["The [MASK] rose sharply on Monday.", "She scored the winning [MASK]."]

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        return AutoModelForMaskedLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        import torch

        top_k = int((params or {}).get("top_k", 5))
        if top_k < 1:
            raise ValueError(f"params: top_k={top_k} must be >= 1.")
        rows: list[dict[str, Any]] = []
        texts = frame[self.input_columns()[0]].astype(str).tolist()
        with torch.inference_mode():
            for input_row, text in enumerate(texts):
                for marker in MASK_MARKERS:
                    text = text.replace(marker, processor.mask_token)
                encoded = processor(text, truncation=True, max_length=self.block_size, return_tensors="pt")
                positions = (encoded["input_ids"][0] == processor.mask_token_id).nonzero()[:, 0].tolist()
                if not positions:
                    raise ValueError(f"input row {input_row}: no mask token in {text!r}; mark the word to fill "
                                     f"with {processor.mask_token} (or [MASK] / <mask>).")
                probs = model(**encoded).logits[0].float().softmax(dim=-1)
                for mask, position in enumerate(positions):
                    scores, ids = probs[position].topk(min(top_k, probs.shape[-1]))
                    for rank, (score, token_id) in enumerate(zip(scores.tolist(), ids.tolist(), strict=True)):
                        filled = encoded["input_ids"][0].clone()
                        filled[position] = token_id
                        rows.append({"input_row": input_row, "mask": mask, "rank": rank,
                                     "token": processor.decode([token_id]).strip(), "token_id": token_id,
                                     "score": score, "sequence": processor.decode(filled, skip_special_tokens=True)})
        return pd.DataFrame(rows, columns=[name for _, name in self.serving_schema()["outputs"]])


def mask_tokens(eligible: Any, probability: float, word_starts: Any = None) -> Any:
    """Tokens chosen for prediction [B, L] (bool), at least one per row with an eligible token.

    Each eligible token (with `word_starts`: each word, by its first token) is chosen with `probability`; a row
    left without any gets one, uniformly among its eligible tokens (words). The draws have fixed shapes, from
    torch's global RNG: the same RNG state gives the same masks.
    """
    import torch

    if word_starts is None:
        candidates, owner = eligible, None
    else:
        width = eligible.shape[1]
        # the start of the word each token belongs to (-1 before the first start)
        index = torch.arange(width)[None, :].expand_as(eligible)
        owner = torch.where(word_starts.bool(), index, torch.full_like(index, -1)).cummax(dim=1).values
        candidates = word_starts.bool() & eligible
    chosen = torch.bernoulli(torch.full(eligible.shape, probability)).bool() & candidates
    fallback = torch.rand(eligible.shape).masked_fill(~candidates, -1.0).argmax(dim=1)
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    chosen[empty, fallback[empty]] = True
    if owner is not None:
        chosen = chosen.gather(1, owner.clamp(min=0)) & owner.ge(0) & eligible
    return chosen


def _wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens around one sequence: [CLS] ... [SEP] (BERT), <s> ... </s> (RoBERTa), else BOS ... EOS."""
    head = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    tail = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([head] if head is not None else []), ([tail] if tail is not None else [])
