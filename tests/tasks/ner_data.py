"""A local folder laid out like the eriktks/conll2003 Hub repo (config conll2003): tokens and ner_tags (IOB2 ids of
O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, B-MISC, I-MISC), plus the pos/chunk columns the real set has.

    write_conll_folder(tmp_path / "conll2003", rows_per_split=40)
    datasets.load_dataset(str(folder), "conll2003")
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

PEOPLE = [["Ada", "Lovelace"], ["Alan", "Turing"], ["Grace", "Hopper"], ["Bob"]]
PLACES = [["London"], ["Paris"], ["New", "York"], ["Rome"]]
VERBS = ["visited", "left", "saw", "loved"]
TAGS = {"PER": (1, 2), "LOC": (5, 6)}


def _sentence(rng: random.Random) -> tuple[list[str], list[int]]:
    person, place = rng.choice(PEOPLE), rng.choice(PLACES)
    words, tags = [], []
    for name, kind in ((person, "PER"), ([rng.choice(VERBS)], None), (place, "LOC"), (["."], None)):
        for i, word in enumerate(name):
            words.append(word)
            tags.append(0 if kind is None else TAGS[kind][0 if i == 0 else 1])
    return words, tags


def write_conll_folder(root: Path, rows_per_split: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "conll2003").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = []
        for idx in range(rows_per_split):
            words, tags = _sentence(rng)
            rows.append({"id": str(idx), "tokens": words, "pos_tags": [0] * len(words),
                         "chunk_tags": [0] * len(words), "ner_tags": tags})
        pd.DataFrame(rows).to_parquet(root / "conll2003" / f"{split}-00000-of-00001.parquet", index=False)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: conll2003\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: conll2003/{s}-*\n" for s in ("train", "validation", "test"))
        + "---\n# CoNLL-2003 (generated for tests)\n")
    return root
