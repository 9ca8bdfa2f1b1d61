"""`_target_` instantiation without Hydra (trainer_core runs inside the ranks, where Hydra is not imported).

    instantiate({"_target_": "torch.optim.SGD", "momentum": 0.9}, params, lr=0.1)
"""

from __future__ import annotations

import importlib
from typing import Any


def import_object(target: str) -> Any:
    """`package.module.Name` -> the object."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ValueError(f"_target_={target!r}: needs `package.module.Name`.")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"_target_={target!r} cannot be imported: {err}") from err


def instantiate(config: dict[str, Any], *args: Any, **extra: Any) -> Any:
    """`{_target_: "pkg.mod.Name", **kwargs}` -> pkg.mod.Name(*args, **kwargs, **extra)."""
    config = dict(config)
    target = config.pop("_target_", None)
    if not target:
        raise ValueError(f"{config}: needs `_target_: package.module.Name`.")
    return import_object(target)(*args, **config, **extra)
