"""Task families: one module per family, each defining one `TaskFamily` subclass (trainer_core/tasks/base.py).

    from trainer_core.tasks import get_task, families
    family = get_task("text_classification")(task_spec)
    model = family.build_model(model_spec)

Families are found by discovery: every module of this package not starting with `_` (and not `base`) that
defines a TaskFamily subclass with a `name`. Adding a family is adding one module here and its YAML in conf/task/.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from trainer_core.tasks.base import TaskFamily


@functools.cache
def families() -> dict[str, type[TaskFamily]]:
    """Every family of this package, by `task.family` name."""
    found: dict[str, type[TaskFamily]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, TaskFamily) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return found


def get_task(family: str) -> type[TaskFamily]:
    """The TaskFamily class of a `task.family` name."""
    known = families()
    if family not in known:
        raise ValueError(f"task.family={family!r}: use one of {', '.join(sorted(known))} (modules of trainer_core/tasks/).")
    return known[family]
