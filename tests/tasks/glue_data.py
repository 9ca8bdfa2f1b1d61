"""A local folder laid out like the nyu-mll/glue Hub repo with all nine subsets in their real schemas.

    root = write_glue(tmp_path / "glue", rows_per_split=24)
    datasets.load_dataset(str(root), "mnli")    # train, validation_matched, validation_mismatched, test_matched, ...

Labels are learnable from the words (so a few steps move the metrics); test labels are -1 as on the Hub.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from tests.pipeline.helpers import sentence

PAIRS = {"mrpc": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
         "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
         "wnli": ("sentence1", "sentence2")}
SINGLE = {"cola": "sentence", "sst2": "sentence"}
SPLITS = {"mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")}
CLASSES = {"mnli": 3}


def _row(subset: str, rng: random.Random, idx: int) -> dict:
    if subset == "stsb":
        score = round(rng.uniform(0, 5), 2)
        first = sentence(rng, True)
        return {"sentence1": first, "sentence2": first if score > 2.5 else sentence(rng, False), "label": score,
                "idx": idx}
    label = rng.randrange(CLASSES.get(subset, 2))
    if subset in SINGLE:
        return {SINGLE[subset]: sentence(rng, bool(label)), "label": label, "idx": idx}
    a, b = PAIRS[subset]
    first = sentence(rng, True)
    return {a: first, b: first if label == 0 else sentence(rng, label == 1), "label": label, "idx": idx}


def write_glue(root: Path, rows_per_split: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    configs = []
    for subset in (*SINGLE, *PAIRS):
        splits = SPLITS.get(subset, ("train", "validation", "test"))
        (root / subset).mkdir(parents=True, exist_ok=True)
        for split in splits:
            frame = pd.DataFrame([_row(subset, rng, i) for i in range(rows_per_split)])
            if split.startswith("test"):
                frame["label"] = -1.0 if subset == "stsb" else -1
            frame.to_parquet(root / subset / f"{split}-00000-of-00001.parquet", index=False)
        configs.append(f"- config_name: {subset}\n  data_files:\n"
                       + "".join(f"  - split: {s}\n    path: {subset}/{s}-*\n" for s in splits))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n# GLUE (generated for tests)\n")
    return root
