"""Tiny raw data, a tokenizer and a model spec for each task family, in the real datasets' schemas.

    from tests.tasks.factories import family_cases, tokenizer_for
    case = family_cases()["text_classification"]
    family = get_task(case.spec.family)(case.spec)

Every family of trainer_core/tasks/ needs a case: a module tests/tasks/cases/<family>.py defining CASE (the
contract test fails for a family without one).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer_core.spec import ModelSpec, TaskSpec

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


@dataclass
class FamilyCase:
    spec: TaskSpec
    raw: dict[str, list]
    """Raw columns as the Hub dataset has them (a few rows)."""
    model: ModelSpec = field(default_factory=lambda: ModelSpec(config=dict(TINY_BERT), dropout=0.0))
    processor: Callable[[Any, dict[str, list]], Any] | None = None
    """Builds the tokenizer / image processor from (family, raw); default: WordPiece on the family's texts."""


@functools.cache
def family_cases() -> dict[str, FamilyCase]:
    """CASE of every module in tests/tasks/cases/, by family name."""
    from tests.tasks import cases

    found = {}
    for info in pkgutil.iter_modules(cases.__path__):
        case = importlib.import_module(f"{cases.__name__}.{info.name}").CASE
        found[case.spec.family] = case
    return found


def tokenizer_for(family: Any, raw: dict[str, list]) -> Any:
    """A WordPiece tokenizer trained on the case's own texts (what model.tokenizer=wordpiece builds)."""
    import datasets

    from stages.tokenizers import train_wordpiece

    return train_wordpiece(family.tokenizer_texts(datasets.Dataset.from_dict(raw)), vocab_size=200)
