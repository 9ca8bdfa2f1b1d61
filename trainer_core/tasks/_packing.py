"""Blocks of tokens for the language-modelling families (causal_lm, masked_lm): grouping, packing, masks, metrics.

    blocks = make_blocks(token_lists, doc_ids, block_size=128, packing=True)   # -> input_ids, position_ids, ...
    mask = packed_causal_mask(position_ids, lengths)                            # [B, 1, L, L] bool, True = attend

Grouping (run_clm / run_mlm): the documents of a map batch are concatenated and cut every `block_size` tokens;
attention runs over the whole block. Packing: the same cut, but each block carries position ids that restart at 0
at every document start (and at the block start), and the attention mask is block-diagonal: no token sees a token
of another document. Both keep the last, shorter block (the collator pads it) so that no document is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from trainer_core.tasks.base import IGNORE_INDEX


def non_empty(texts: Sequence[Any]) -> list[int]:
    """Positions of the documents that have text (wikitext's blank lines and None are skipped)."""
    return [i for i, text in enumerate(texts) if text is not None and str(text).strip()]


def make_blocks(token_lists: Sequence[Sequence[int]], doc_ids: Sequence[int], block_size: int, packing: bool,
                extras: dict[str, Sequence[Sequence[int]]] | None = None) -> dict[str, list]:
    """Concatenate the documents' tokens and cut them into blocks of `block_size`.

    Returns input_ids, example_id (the document the block starts in) and, with packing, position_ids that
    restart at 0 at each document start and at each block start. `extras` are per-token columns cut the same way
    (e.g. masked_lm's word_starts).
    """
    stream: list[int] = []
    positions: list[int] = []
    owners: list[int] = []
    extra_streams: dict[str, list[int]] = {name: [] for name in (extras or {})}
    for k, (tokens, doc) in enumerate(zip(token_lists, doc_ids, strict=True)):
        stream.extend(tokens)
        positions.extend(range(len(tokens)))
        owners.extend([doc] * len(tokens))
        for name, values in (extras or {}).items():
            extra_streams[name].extend(values[k])
    out: dict[str, list] = {"input_ids": [], "example_id": []}
    if packing:
        out["position_ids"] = []
    for name in extra_streams:
        out[name] = []
    for start in range(0, len(stream), block_size):
        end = min(start + block_size, len(stream))
        out["input_ids"].append(stream[start:end])
        out["example_id"].append(owners[start])
        if packing:
            # positions restart at every document start, and at the block start: a document cut by the block
            # boundary goes on as a new one
            block_positions, previous = [], -1
            for i in range(start, end):
                previous = 0 if i == start or positions[i] == 0 else previous + 1
                block_positions.append(previous)
            out["position_ids"].append(block_positions)
        for name, values in extra_streams.items():
            out[name].append(values[start:end])
    return out


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document number of each token of a block [B, L]: a new document starts wherever position_ids == 0."""
    return position_ids.eq(0).long().cumsum(dim=1)


def packed_causal_mask(position_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, L, L] (True = may attend): token i sees token j <= i of its own document.

    Padding (positions >= lengths) is a segment of its own, so that no row of the mask is empty (an empty row
    gives NaN in softmax); padding is never a target.
    """
    import torch

    width = position_ids.shape[1]
    segments = segment_ids(position_ids)
    padding = torch.arange(width, device=position_ids.device)[None, :] >= lengths[:, None]
    segments = segments.masked_fill(padding, -1)
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None, :, :]


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.Tensor:
    import torch

    width = width or max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def perplexity(predictions: dict[str, Any]) -> tuple[float, float]:
    """(mean loss per token, exp of it) from per-example loss sums and token counts, in float64.

    The same sums the trainer divides for eval_loss: perplexity == exp(eval_loss).
    """
    import math

    import numpy as np

    total = float(np.asarray(predictions["loss_sum"], dtype=np.float64).sum())
    tokens = float(np.asarray(predictions["tokens"], dtype=np.float64).sum())
    loss = total / max(tokens, 1.0)
    return loss, math.exp(min(loss, 700.0))  # exp overflows past ~709


def token_accuracy(predictions: dict[str, Any]) -> float:
    import numpy as np

    tokens = float(np.asarray(predictions["tokens"], dtype=np.float64).sum())
    return float(np.asarray(predictions["correct"], dtype=np.float64).sum()) / max(tokens, 1.0)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 (Lin, 2004: LCS-based recall and precision, beta = 1) of two token sequences."""
    if not candidate or not reference:
        return float(candidate == reference)
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def valid(row: Any) -> list[int]:
    """The ids of a row padded with IGNORE_INDEX."""
    return [int(t) for t in row if int(t) != IGNORE_INDEX]


def block_size_errors(block_size: int, from_option: bool, limit: int | None) -> list[str]:
    """A block longer than the model's positions, named by the key that set it."""
    if limit is None or block_size <= limit:
        return []
    key = "task.options.block_size" if from_option else "task.max_seq_length"
    return [f"{key}={block_size}: the model has {limit} positions; set {key} <= {limit}."]


def empty_split_errors(raw: Any, column: str) -> list[str]:
    """Splits with no document that has text (nothing to cut into blocks)."""
    return [f"task.text_column={column!r}: the {split} split has no document with text ({len(dataset)} rows, all "
            "empty): check task.dataset / task.subset." for split, dataset in raw.items()
            if not non_empty(dataset[column])]
