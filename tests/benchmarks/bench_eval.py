"""Benchmark: scoring a finished model under autocast (mixed_precision) vs with bf16 weights (trainer.bf16_full_eval).

    .venv/bin/python -m flows.finetune paths.root=/tmp/eval-root             # once: the default run's model
    .venv/bin/python tests/benchmarks/bench_eval.py /tmp/eval-root --repeats 5

The evaluate and predict stages' own code path (stages.inference.inference_trainer, rows sorted by length) on the
validation and test splits of the run under <root>, in this one process, alternating the two settings so that the
machine's drift hits both; the first pass of each (kernel warm-up) is left out of the medians. Prints a markdown
table: median seconds per split, rows/s, the metrics, and how many predicted labels differ from autocast's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SETTINGS = {"autocast": False, "bf16_full_eval": True}


def _ref(root: Path, stage: str):
    from stages.refs import Ref

    refs = sorted((root / "stages" / stage).glob("*/ref.json"), key=lambda p: p.stat().st_mtime)
    if not refs:
        sys.exit(f"{root}: no finished {stage} stage; run `python -m flows.finetune paths.root={root}` first")
    return Ref.load(refs[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a paths.root that holds a finished run (its newest model)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting and split")
    args = parser.parse_args()
    import datasets
    import numpy as np

    from stages.inference import by_length, inference_trainer

    model, data = _ref(args.root, "train"), _ref(args.root, "prepare_data")
    splits = datasets.load_from_disk(data.dataset_dir)
    out = Path(tempfile.mkdtemp(prefix="bench_eval-"))
    trainers = {name: inference_trainer(model, data, out / name, flag) for name, flag in SETTINGS.items()}
    rows = {split: by_length(splits[split], trainers["autocast"].task)[0] for split in ("validation", "test")}
    seconds = {(name, split): [] for name in SETTINGS for split in rows}
    outputs = {}
    for repeat in range(args.repeats + 1):
        for split, dataset in rows.items():
            for name, trainer in trainers.items():
                started = time.perf_counter()
                outputs[name, split] = trainer.predict(dataset, metric_key_prefix=split)
                if repeat:  # the first pass warms the kernels up
                    seconds[name, split].append(time.perf_counter() - started)
    print(f"\n{args.repeats} passes each after a warm-up; model {model.path}\n")
    print("| setting | split | rows | median s (min-max) | rows/s | accuracy | loss | labels unlike autocast's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for split, dataset in rows.items():
        reference = outputs["autocast", split].predictions.argmax(-1)
        for name in SETTINGS:
            times, output = seconds[name, split], outputs[name, split]
            median = statistics.median(times)
            differ = int(np.sum(output.predictions.argmax(-1) != reference))
            print(f"| {name} | {split} | {len(dataset)} | {median:.2f} ({min(times):.2f}-{max(times):.2f}) | "
                  f"{len(dataset) / median:.0f} | {output.metrics.get(f'{split}_accuracy', float('nan')):.4f} | "
                  f"{output.metrics.get(f'{split}_loss', float('nan')):.4f} | {differ} |")


if __name__ == "__main__":
    main()
