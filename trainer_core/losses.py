"""Loss hooks, set through `trainer.loss: {_target_: trainer_core.losses.WeightedCrossEntropy, ...}`.

A loss hook is called as `loss(logits, labels) -> Tensor [B]`: the loss of each example, summed over its items
(tokens); the trainer sums over the batch and divides by the items of the whole accumulation window, so the
hook never sees the accumulation or the world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class WeightedCrossEntropy:
    """Cross-entropy where an example of class c weighs class_weights[c] (e.g. [1.0, 3.0] for a rare class 1).

    Normalised by the number of examples, not the sum of weights (torch's weighted 'mean'): a weight of 3
    makes that example's gradient exactly 3 times larger.
    """

    def __init__(self, class_weights: Sequence[float], label_smoothing: float = 0.0, ignore_index: int = -100):
        self.class_weights = torch.tensor(list(class_weights), dtype=torch.float32)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.class_weights.device != logits.device:  # moved once, not copied (a host sync on CUDA) every step
            self.class_weights = self.class_weights.to(logits.device)
        weight = self.class_weights
        if logits.dim() == 3:  # token level: [B, L, C]
            per_token = F.cross_entropy(
                logits.float().transpose(1, 2), labels.long(), weight=weight, reduction="none",
                ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            )
            return per_token.sum(dim=1)
        return F.cross_entropy(
            logits.float(), labels.long(), weight=weight, reduction="none", label_smoothing=self.label_smoothing
        )
