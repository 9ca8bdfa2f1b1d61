"""Benchmark: trainer_core vs transformers.Trainer vs a plain Accelerate loop, side by side on one machine.

    .venv/bin/python tests/benchmarks/bench_trainer.py                          # the default run's size: 250 x 32
    .venv/bin/python tests/benchmarks/bench_trainer.py --steps 60 --repeats 2 --only hf_grouped,ours_same

The project's default data and model (all-MiniLM-L6-v2 from its PyPI wheel, the Rotten Tomatoes rows, max_length
128, batch 32, learning rate 5e-5, 10 % warmup, weight decay 0.01, clipping at 1.0, one CPU process). Each run is a
fresh subprocess (its own peak RSS, no warm caches from another contender), and the runs alternate between the
contenders on every repeat so that all see the same machine noise. Every contender starts from the same initial
weights and is scored by the same evaluation (fp32, the validation split) after training.

Contenders:
  hf_default     transformers.Trainer as configured by default: random order, DataCollatorWithPadding, its default
                 optimizer (adamw_torch_fused since torch 2.8), fp32
  hf_grouped     the same with train_sampling_strategy="group_by_length"
  accelerate     the `run_glue_no_trainer.py` loop: random order, DataCollatorWithPadding, torch AdamW, fp32
  ours_same      trainer_core at hf_grouped's settings: length-grouped plan, adamw_torch_fused, fp32
  ours_default   trainer_core as the default run configures it: mixed_precision=auto (bf16 where the CPU runs it
                 natively), adamw_torch_fused, length-grouped plan
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CONTENDERS = ("hf_default", "hf_grouped", "accelerate", "ours_same", "ours_default")
HYPER = dict(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0, seed=42)


def load_data(cache: Path, num_train: int):
    """Tokenized train / validation rows (cached between the subprocesses) and the model folder."""
    import datasets

    from flows.config import compose
    from stages.common import resolve_model_path

    cfg = compose([f"paths.root={cache / 'root'}"])
    model_dir = resolve_model_path(cfg.model)
    if not (cache / "train").exists():
        from transformers import AutoTokenizer

        from stages.sources import load_raw

        raw = load_raw(cfg.task, cfg.paths.root)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for split in ("train", "validation"):
            rows = raw[split]
            encoded = tokenizer(list(rows["text"]), truncation=True, max_length=cfg.task.max_seq_length)
            datasets.Dataset.from_dict({**encoded, "labels": list(rows["label"])}).save_to_disk(cache / split)
    train = datasets.load_from_disk(cache / "train")
    return train.select(range(min(num_train, len(train)))), datasets.load_from_disk(cache / "validation"), model_dir


class Recording:
    """A collator that counts what it hands the model: real (attended) and padded tokens."""

    def __init__(self, collate):
        self.collate, self.real, self.padded = collate, 0, 0

    def __call__(self, rows):
        batch = self.collate(rows)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        return batch


def padding_collator():
    from trainer_core.spec import TaskSpec
    from trainer_core.tasks import get_task

    return get_task("text_classification")(TaskSpec()).collator(None)  # DataCollatorWithPadding's result


def initial_model(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same classifier head for every contender
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def run_hf(model, train, steps, batch, grouped: bool, out: str, collator) -> None:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    kw = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    args = HFArgs(output_dir=out, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                  per_device_train_batch_size=batch, max_steps=steps, warmup_steps=0.1, logging_steps=steps,
                  dataloader_drop_last=False, **HYPER, **kw)
    HFTrainer(model=model, args=args, train_dataset=train, data_collator=collator).train()


def run_accelerate(model, train, steps, batch, collator) -> None:
    import math

    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from trainer_core.optim import get_decay_parameter_names

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(HYPER["seed"])
    decay = set(get_decay_parameter_names(model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": HYPER["weight_decay"]},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=HYPER["learning_rate"])
    loader = DataLoader(train.with_format("torch"), shuffle=True, batch_size=batch, collate_fn=collator)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=math.ceil(0.1 * steps), num_training_steps=steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    step = 0
    while step < steps:
        for batch_ in loader:
            loss = model(**batch_).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), HYPER["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break


def run_ours(model, train, steps, batch, out: str, collator, mixed_precision: str) -> None:
    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import TaskSpec
    from trainer_core.trainer import Trainer

    args = TrainingArguments(save_strategy="no", disable_tqdm=True, per_device_train_batch_size=batch,
                             max_steps=steps, warmup_steps=0.1, logging_steps=10, optim="adamw_torch_fused",
                             mixed_precision=mixed_precision, train_sampling_strategy="group_by_length", **HYPER)
    plan = build_batch_plan(len(train), batch, 1, 0, steps, seed=args.seed, lengths=[len(x) for x in train["input_ids"]],
                            group_by_length=True, shuffle=True)
    trainer = Trainer(model, args, train_dataset=train, batch_plan=plan, output_dir=out, data_collator=collator,
                      task_spec=TaskSpec(metrics=[]))
    trainer.train()
    trainer.cleanup()


def accuracy(model, validation) -> float:
    """fp32, sorted by length, batch 64: the same scoring for every contender."""
    import numpy as np
    import torch

    model.eval()
    order = np.argsort([len(x) for x in validation["input_ids"]], kind="stable")
    collate, correct = padding_collator(), 0
    with torch.no_grad():
        for start in range(0, len(order), 64):
            rows = [validation[int(i)] for i in order[start:start + 64]]
            batch = collate(rows)
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(order)


def one(name: str, steps: int, batch: int, cache: Path) -> dict:
    """Train and score one contender in this process; its figures as a dict."""
    train, validation, model_dir = load_data(cache, steps * batch)
    model = initial_model(model_dir)
    collator = Recording(padding_collator())
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        if name in ("hf_default", "hf_grouped"):
            run_hf(model, train, steps, batch, name == "hf_grouped", out, collator)
        elif name == "accelerate":
            run_accelerate(model, train, steps, batch, collator)
        else:
            run_ours(model, train, steps, batch, out, collator, "no" if name == "ours_same" else "auto")
        seconds = time.perf_counter() - started
    model = getattr(model, "module", model)
    return {"name": name, "seconds": seconds, "samples": steps * batch, "real": collator.real,
            "padded": collator.padded, "accuracy": accuracy(model.float(), validation),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench_trainer_data"))
    cli = parser.parse_args()
    cache = Path(cli.cache)
    if cli.one:
        print("RESULT " + json.dumps(one(cli.one, cli.steps, cli.batch, cache)), flush=True)
        return

    import torch

    names = cli.only.split(",")
    load_data(cache, cli.steps * cli.batch)  # tokenize once, before any timing
    results: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(cli.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):  # alternate the order too
            done = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(cli.steps), "--batch",
                                   str(cli.batch), "--cache", str(cache)], capture_output=True, text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"{name}: {results[name][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)

    base = statistics.median(r["seconds"] for r in results.get("hf_default", results[names[0]]))
    print(f"\nMiniLM-L6 (22.7M params), Rotten Tomatoes, {cli.steps} steps x batch {cli.batch}, one CPU process, "
          f"{torch.get_num_threads()} threads, median of {cli.repeats}; precision auto here = "
          f"{__import__('trainer_core.precision', fromlist=['resolve']).resolve('auto')[0]}\n")
    print("| contender | train s | samples/s | real tokens/s | padded tokens/s | padding | peak RSS MiB | "
          "val. accuracy | vs hf_default |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        runs = results[name]
        seconds = statistics.median(r["seconds"] for r in runs)
        r = runs[0]
        print(f"| {name} | {seconds:.1f} | {r['samples'] / seconds:.1f} | {r['real'] / seconds:,.0f} | "
              f"{r['padded'] / seconds:,.0f} | {1 - r['real'] / r['padded']:.1%} | "
              f"{max(x['peak_rss_mib'] for x in runs):,.0f} | {statistics.mean(x['accuracy'] for x in runs):.3f} | "
              f"{base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
