"""Local folders laid out like the Hub repos of SQuAD (rajpurkar/squad, rajpurkar/squad_v2) and SWAG
(allenai/swag), generated for tests: the same configs, splits, columns and types, read with the same
`datasets.load_dataset(path, name)` call users make with the Hub id.

    write_squad_folder(tmp_path / "squad", v2=True)   # squad_v2/{train,validation}-00000-of-00001.parquet
    write_swag_folder(tmp_path / "swag")              # regular/{train,validation,test}-00000-of-00001.parquet

The texts are templated ("<name> lives in <city> ..."), with some contexts long enough to need several
windows; v2 adds questions about someone the context never mentions (no answer).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor wendy".split()
CITIES = "paris london berlin madrid rome vienna oslo lisbon dublin prague warsaw athens".split()
JOBS = "baker pilot doctor painter farmer teacher singer sailor lawyer chemist".split()
FILLER = ("the weather was mild that year and the market square was busy with traders from the coast . "
          "many people walked along the river in the evening . ").split()

SQUAD_SCHEMA = pa.schema([
    ("id", pa.string()), ("title", pa.string()), ("context", pa.string()), ("question", pa.string()),
    ("answers", pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))])),
])
SWAG_ENDINGS = [f"ending{i}" for i in range(4)]
SWAG_SCHEMA = pa.schema([
    ("video-id", pa.string()), ("fold-ind", pa.string()), ("startphrase", pa.string()), ("sent1", pa.string()),
    ("sent2", pa.string()), ("gold-source", pa.string()), *[(e, pa.string()) for e in SWAG_ENDINGS],
    ("label", pa.int32()),
])


def squad_rows(rng: random.Random, count: int, v2: bool, split: str) -> list[dict]:
    rows = []
    for i in range(count):
        name, other = rng.sample(NAMES, 2)
        city, job = rng.choice(CITIES), rng.choice(JOBS)
        # a third of the contexts are long: their answer may sit in a later window
        filler = " ".join(rng.choices(FILLER, k=rng.choice([5, 10, 60])))
        context = f"{filler} {name} lives in {city} and works as a {job} ."
        if v2 and i % 3 == 2:
            question, text = f"where does {other} live ?", None
        elif i % 2:
            question, text = f"where does {name} live ?", city
        else:
            question, text = f"what does {name} work as ?", job
        start = context.index(f" {text} ") + 1 if text else None
        rows.append({"id": f"{split}-{i:05d}", "title": name.title(), "context": context, "question": question,
                     "answers": {"text": [text] if text else [], "answer_start": [start] if text else []}})
    return rows


def write_squad_folder(root: Path, rows_per_split: int = 64, v2: bool = False, seed: int = 0) -> Path:
    """rajpurkar/squad (config plain_text) or rajpurkar/squad_v2 (config squad_v2): train and validation."""
    rng = random.Random(seed)
    config = "squad_v2" if v2 else "plain_text"
    (root / config).mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = squad_rows(rng, rows_per_split, v2, split)
        pq.write_table(pa.Table.from_pylist(rows, schema=SQUAD_SCHEMA), root / config / f"{split}-00000-of-00001.parquet")
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in ("train", "validation"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n"
                                    f"# {config} (generated for tests)\n")
    return root


def swag_rows(rng: random.Random, count: int, split: str) -> list[dict]:
    rows = []
    for i in range(count):
        name, city, job = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS)
        right = f"arrives in {city} ."
        wrong = [f"eats the {job} .", f"sings to the {rng.choice(CITIES)} moon .", f"turns into a {job} ."]
        label = rng.randrange(4)
        endings = wrong[:label] + [right] + wrong[label:]
        sent1, sent2 = f"{name} takes the train to {city} .", name
        rows.append({"video-id": f"anetv_{i:05d}", "fold-ind": str(i), "startphrase": f"{sent1} {sent2}",
                     "sent1": sent1, "sent2": sent2, "gold-source": "gold",
                     **dict(zip(SWAG_ENDINGS, endings, strict=True)), "label": -1 if split == "test" else label})
    return rows


def write_swag_folder(root: Path, rows_per_split: int = 64, seed: int = 0) -> Path:
    """allenai/swag, config regular: train, validation and test (test labels -1, as on the Hub)."""
    rng = random.Random(seed)
    (root / "regular").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        table = pa.Table.from_pylist(swag_rows(rng, rows_per_split, split), schema=SWAG_SCHEMA)
        pq.write_table(table, root / "regular" / f"{split}-00000-of-00001.parquet")
    files = "".join(f"  - split: {s}\n    path: regular/{s}-*\n" for s in ("train", "validation", "test"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: regular\n  data_files:\n{files}---\n"
                                    "# swag (generated for tests)\n")
    return root
