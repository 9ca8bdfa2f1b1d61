"""Generated text in the language-modelling datasets' schemas, and folders laid out like their Hub repos.

    from tests.tasks.lm_data import documents, write_wikitext
    texts = documents(40, seed=0)                       # sentences of a tiny made-up language, reproducible
    folder = write_wikitext(tmp_path / "wikitext")      # <folder>/wikitext-2-raw-v1/{train,validation,test}-*.parquet

Salesforce/wikitext: one column `text`, one line per row, blank lines and " = Heading = " lines between
paragraphs, as in wikitext-2-raw-v1. Nothing here touches the network.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old king", "my sister", "the river", "a small bird", "the city council"]
VERBS = ["sees", "follows", "builds", "remembers", "paints", "carries", "answers"]
OBJECTS = ["the bridge", "a red house", "the market", "an empty boat", "the long road", "a quiet garden"]
ENDINGS = ["at dawn", "in winter", "every morning", "before the storm", "with great care", "once again"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)} ."


def documents(count: int, seed: int = 0, sentences: tuple[int, int] = (2, 5)) -> list[str]:
    """`count` paragraphs of 2-5 sentences of a small grammar: learnable, so a few steps lower the loss."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(*sentences))).capitalize() for _ in range(count)]


def wikitext_lines(count: int, seed: int = 0) -> list[str]:
    """Rows as wikitext-2-raw-v1 has them: headings, paragraphs ending in a newline, blank rows between."""
    rows = []
    for i, paragraph in enumerate(documents(count, seed)):
        if i % 4 == 0:
            rows += ["", f" = Section {i // 4} = \n", ""]
        rows.append(f" {paragraph} \n")
    return rows


def write_wikitext(folder: Path, subset: str = "wikitext-2-raw-v1", rows: tuple[int, int, int] = (60, 12, 12)) -> Path:
    """A folder that `datasets.load_dataset(folder, subset)` reads like the Hub's Salesforce/wikitext."""
    import datasets

    folder = Path(folder)
    (folder / subset).mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate(zip(("train", "validation", "test"), rows, strict=True)):
        datasets.Dataset.from_dict({"text": wikitext_lines(count, seed)}).to_parquet(
            str(folder / subset / f"{split}-00000-of-00001.parquet"))
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        f"- config_name: {subset}\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: {subset}/{s}-*\n" for s in ("train", "validation", "test"))
        + "---\n# wikitext (generated for tests)\n"
    )
    return folder
