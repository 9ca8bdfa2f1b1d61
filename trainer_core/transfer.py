"""Host-to-device copies that do not make the host wait for the device.

On CUDA a copy from pageable host memory is a host sync: the host stalls until the device has run everything
queued, so the next batch's kernels are not queued while the current ones run. A copy from pinned memory with
non_blocking is not (the caching host allocator keeps the pinned buffer until the copy is done). On the CPU both
are the tensor itself.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def batch_to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch, via to_device; anything else as it is."""
    from accelerate.utils import recursively_apply

    return recursively_apply(to_device, batch, device)
