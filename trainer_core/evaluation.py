"""The evaluation loop: every sample of a dataset scored once, over all ranks, without moving the training RNG.

    loader = eval_dataloader(features, batch_size=8, collate_fn=family.collator(tokenizer, model), accelerator=acc)
    output = prediction_loop(model, loader, acc, family, prefix="eval", dataset=full_split)
    output.metrics      # {"eval_loss": ..., "eval_accuracy": ...}

The task family (trainer_core/tasks/) is the one task-specific piece: its eval_step runs a batch (forward or
generate) and returns small tensors; the loop gathers them over the ranks, pads and concatenates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer_core.transfer import batch_to_device


class PredictionOutput(NamedTuple):
    predictions: np.ndarray | None
    """The task family's prediction_key output (class logits for classification), one row per sample."""
    label_ids: np.ndarray | None
    metrics: dict[str, float]
    num_samples: int
    outputs: dict[str, np.ndarray] = {}
    """Every output of the family's eval_step, gathered: what post-processing reads."""


def eval_dataloader(dataset: Any, batch_size: int, collate_fn: Callable, accelerator: Any) -> DataLoader:
    """Through Accelerate: sharded over the ranks, and gather_for_metrics drops the padding duplicates. The loop
    moves the batches itself (trainer_core.transfer: without a host sync on CUDA)."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, shuffle=False)
    return accelerator.prepare_data_loader(loader, device_placement=False)


def _gather(accelerator: Any, tensor: torch.Tensor, sequence: bool) -> torch.Tensor:
    if sequence:  # a sequence dimension (dim 1) that batches and ranks may have padded differently
        tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=-100)
    return accelerator.gather_for_metrics(tensor)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy()  # numpy has no bf16


def _to_host(gathered: list[tuple[list, torch.Tensor, Callable]]) -> None:
    """Each (parts, device tensor, convert): convert(tensor) appended to parts."""
    for parts, tensor, convert in gathered:
        parts.append(convert(tensor))


def prediction_loop(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], accelerator: Any,
                    task: Any, prefix: str, dataset: Any = None, compute_metrics: Callable | None = None,
                    preprocess_logits: Callable | None = None, seed: int = 0) -> PredictionOutput:
    """Score every batch with the task family's eval_step (in eval mode, then back to the model's mode).

    `{prefix}_loss` is the mean per item over all ranks; `{prefix}_<metric>` what the family's compute_metrics
    makes of the gathered outputs and targets (or compute_metrics(predictions, label_ids), Hugging Face style,
    when one is given). `dataset` is the split being scored, in loader order, with every column the family kept.
    """
    acc = accelerator
    was_training = model.training
    model.eval()
    outputs: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[np.ndarray]] = {}
    losses, items = [], []  # host tensors: summed in torch
    previous: list[tuple[list, torch.Tensor, Callable]] = []
    # evaluation must not move the training RNG, else a resumed run would diverge from an uninterrupted one;
    # and what it draws (masked LM masks) is the same at every evaluation
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(seed)
        for batch in batches:
            inputs, batch_targets = task.split_batch(batch_to_device(batch, acc.device))
            step = task.eval_step(model, inputs, batch_targets)
            gathered = []
            if step.loss is not None:
                gathered += [(losses, acc.gather_for_metrics(step.loss.detach()), torch.Tensor.cpu),
                             (items, acc.gather_for_metrics(step.items), torch.Tensor.cpu)]
            step_outputs = dict(step.outputs)
            if preprocess_logits is not None and task.prediction_key in step_outputs:
                step_outputs[task.prediction_key] = preprocess_logits(step_outputs[task.prediction_key],
                                                                      batch_targets.get("labels"))
            for store, tensors in ((outputs, step_outputs), (targets, batch_targets)):
                for name, tensor in tensors.items():
                    gathered.append((store.setdefault(name, []), _gather(acc, tensor, name in task.sequence_outputs),
                                     _numpy))
            # the batch before this one to the host: on a GPU its copies wait for it while this batch, queued
            # already, keeps the device busy (copying this batch's now would leave it idle between batches)
            _to_host(previous)
            previous = gathered
        _to_host(previous)
    if was_training:
        model.train()
    predictions = {name: concat_padded(parts) for name, parts in outputs.items()}
    references = {name: concat_padded(parts) for name, parts in targets.items()}
    metrics: dict[str, float] = {}
    if losses:
        metrics[f"{prefix}_loss"] = float(torch.cat(losses).sum() / torch.cat(items).sum().clamp(min=1))
    if set(task.target_names) <= set(references):  # a scored split
        if compute_metrics is not None:
            computed = compute_metrics(predictions.get(task.prediction_key), references.get("labels"))
        else:
            computed = task.compute_metrics(predictions, references, dataset) if task.metric_names() else {}
        metrics.update({f"{prefix}_{name}": value for name, value in computed.items()})
    main = predictions.get(task.prediction_key)
    num_samples = len(next(iter(predictions.values()))) if predictions else 0
    return PredictionOutput(main, references.get("labels"), metrics, num_samples, predictions)


def concat_padded(arrays: list[np.ndarray], pad: Any = -100) -> np.ndarray:
    """Concatenate batches along dim 0, right-padding dim 1 when sequence lengths differ."""
    if not arrays:
        return np.zeros((0,))
    if arrays[0].ndim < 2 or len({a.shape[1] for a in arrays}) == 1:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    padded = []
    for a in arrays:
        widths = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        padded.append(np.pad(a, widths, constant_values=pad))
    return np.concatenate(padded)
