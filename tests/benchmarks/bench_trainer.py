"""Benchmark: trainer_core vs transformers.Trainer vs a plain Accelerate loop, side by side on one machine.

    .venv/bin/python tests/benchmarks/bench_trainer.py                          # the default run's size: 250 x 32
    .venv/bin/python tests/benchmarks/bench_trainer.py --steps 60 --repeats 2 --only hf_grouped,ours_same
    .venv/bin/python tests/benchmarks/bench_trainer.py --interleave 5 --only hf_grouped,ours_same

The project's default data and model (all-MiniLM-L6-v2 from its PyPI wheel, the Rotten Tomatoes rows, max_length
128, batch 32, learning rate 5e-5, 10 % warmup, weight decay 0.01, clipping at 1.0, one CPU process). Each run is a
fresh subprocess (its own peak RSS, no warm caches from another contender), and the runs alternate between the
contenders on every repeat so that all see the same machine noise. Every contender starts from the same initial
weights and is scored by the same evaluation (fp32, the validation split) after training.

--interleave N: two contenders in one process, each in a thread of its own, taking turns of N optimizer steps (a
callback at each step's end hands the turn over): the machine's speed drifts over minutes by as much as the
difference measured, and here both see the same drift. Each contender's time is the sum of its turns (its loop from
the first step to the last, without set-up); one process, so no peak RSS of its own. Both draw dropout from torch's
one global generator, so their weights differ from a standalone run's (not their speed).

Contenders:
  hf_default     transformers.Trainer as configured by default: random order, DataCollatorWithPadding, its default
                 optimizer (adamw_torch_fused since torch 2.8), fp32
  hf_grouped     the same with train_sampling_strategy="group_by_length"
  accelerate     the `run_glue_no_trainer.py` loop: random order, DataCollatorWithPadding, torch AdamW, fp32
  ours_same      trainer_core at hf_grouped's settings: length-grouped plan, adamw_torch_fused, fp32
  ours_default   trainer_core as the default run configures it: mixed_precision=auto (bf16 where the CPU runs it
                 natively), adamw_torch_fused, length-grouped plan
  ours_compiled  ours_default with trainer.torch_compile=true (inductor; lengths bucketed to multiples of 16): its
                 time includes compiling, and the first run on a machine fills inductor's cache (later ones reuse it)
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
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CONTENDERS = ("hf_default", "hf_grouped", "accelerate", "ours_same", "ours_default", "ours_compiled")
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


def contender_collator(name: str):
    """What the contender's model is handed: torch_compile's trainer rounds lengths up (counted as padding)."""
    from trainer_core.args import TrainingArguments
    from trainer_core.tasks._common import bucketed

    if name != "ours_compiled":
        return padding_collator()
    return bucketed(padding_collator(), TrainingArguments(torch_compile=True).sequence_multiple())


def initial_model(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same classifier head for every contender
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def run_hf(model, train, steps, batch, grouped: bool, out: str, collator, callbacks=()) -> None:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    kw = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    args = HFArgs(output_dir=out, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                  per_device_train_batch_size=batch, max_steps=steps, warmup_steps=0.1, logging_steps=steps,
                  dataloader_drop_last=False, **HYPER, **kw)
    HFTrainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=list(callbacks)).train()


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


def run_ours(model, train, steps, batch, out: str, collator, mixed_precision: str, callbacks=(),
             compiled: bool = False) -> None:
    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import TaskSpec
    from trainer_core.trainer import Trainer

    # save_on_sigterm off: it installs a signal handler, which only the main thread may (--interleave)
    args = TrainingArguments(save_strategy="no", save_on_sigterm=False, disable_tqdm=True,
                             per_device_train_batch_size=batch, max_steps=steps, warmup_steps=0.1, logging_steps=10,
                             optim="adamw_torch_fused", mixed_precision=mixed_precision, train_sampling_strategy="group_by_length",
                             torch_compile=compiled, **HYPER)
    plan = build_batch_plan(len(train), batch, 1, 0, steps, seed=args.seed, lengths=[len(x) for x in train["input_ids"]],
                            group_by_length=True, shuffle=True)
    trainer = Trainer(model, args, train_dataset=train, batch_plan=plan, output_dir=out, data_collator=collator,
                      task_spec=TaskSpec(metrics=[]), callbacks=list(callbacks))
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


def train_one(name: str, model, train, steps: int, batch: int, out: str, collator, callbacks=()) -> None:
    if name in ("hf_default", "hf_grouped"):
        run_hf(model, train, steps, batch, name == "hf_grouped", out, collator, callbacks)
    elif name == "accelerate":
        run_accelerate(model, train, steps, batch, collator)
    else:
        run_ours(model, train, steps, batch, out, collator, "no" if name == "ours_same" else "auto", callbacks,
                 compiled=name == "ours_compiled")


def one(name: str, steps: int, batch: int, cache: Path) -> dict:
    """Train and score one contender in this process; its figures as a dict."""
    train, validation, model_dir = load_data(cache, steps * batch)
    model = initial_model(model_dir)
    collator = Recording(contender_collator(name))
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train_one(name, model, train, steps, batch, out, collator)
        seconds = time.perf_counter() - started
    model = getattr(model, "module", model)
    return {"name": name, "seconds": seconds, "samples": steps * batch, "real": collator.real,
            "padded": collator.padded, "accuracy": accuracy(model.float(), validation),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Turns:
    """Two trainers in two threads take turns of `every` optimizer steps; each one's time is the sum of its turns.

    Each thread waits for its turn before it builds its trainer: Accelerate's state is process-wide, and our
    Trainer may reset it, never while the other thread is inside Accelerate. A callback of each trainer
    (`callback(name, base)`, base: its framework's TrainerCallback) starts the clock when training begins, and at
    the end of every `every`-th step hands the turn to the other (until that one has finished) and waits for it to
    come back."""

    def __init__(self, names: list[str], every: int) -> None:
        self.names, self.every, self.holder = names, every, names[0]
        self.seconds, self.finished = dict.fromkeys(names, 0.0), set()
        self.changed = threading.Condition()

    def wait(self, name: str) -> float:
        with self.changed:
            self.changed.wait_for(lambda: self.holder == name)
        return time.perf_counter()

    def _hand_over(self, name: str, started: float, last: bool = False) -> None:
        self.seconds[name] += time.perf_counter() - started
        self._pass(name, last)

    def _pass(self, name: str, last: bool) -> None:
        with self.changed:
            if last:
                self.finished.add(name)
            other = next(n for n in self.names if n != name)
            if other not in self.finished:
                self.holder = other
            self.changed.notify_all()

    def callback(self, name: str, base: type):
        turns = self

        class TurnTaking(base):
            started = 0.0

            def on_train_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()  # in its turn already: the thread waited for it before set-up

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % turns.every == 0 and state.global_step < state.max_steps:
                    turns._hand_over(name, self.started)
                    self.started = turns.wait(name)

            def on_train_end(self, args, state, control, **kwargs):
                turns._hand_over(name, self.started, last=True)

        return TurnTaking()

    def release(self, name: str) -> None:
        """A trainer that failed: the other one goes on alone."""
        self._pass(name, last=True)


def interleaved(names: list[str], steps: int, batch: int, cache: Path, every: int) -> list[dict]:
    """Two contenders in one process, taking turns of `every` steps (Turns); their figures as dicts."""
    from transformers import TrainerCallback as HFCallback

    from trainer_core.callbacks import TrainerCallback as OurCallback

    if len(names) != 2 or {"accelerate", "ours_compiled"} & set(names):
        sys.exit("--interleave takes two contenders of hf_default, hf_grouped, ours_same, ours_default (--only a,b)")
    train, validation, model_dir = load_data(cache, steps * batch)
    turns = Turns(names, every)
    models = {name: initial_model(model_dir) for name in names}
    collators = {name: Recording(contender_collator(name)) for name in names}
    failures: dict[str, BaseException] = {}

    def run(name: str, out: str) -> None:
        base = HFCallback if name.startswith("hf_") else OurCallback
        try:
            turns.wait(name)
            train_one(name, models[name], train, steps, batch, out, collators[name], [turns.callback(name, base)])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures[name] = exc
            turns.release(name)

    with tempfile.TemporaryDirectory() as out:
        threads = [threading.Thread(target=run, args=(name, f"{out}/{name}")) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if failures:
        name, exc = next(iter(failures.items()))
        raise SystemExit(f"{name} failed: {exc!r}")
    results = []
    for name in names:
        model = getattr(models[name], "module", models[name])
        results.append({"name": name, "seconds": turns.seconds[name], "samples": steps * batch,
                        "real": collators[name].real, "padded": collators[name].padded,
                        "accuracy": accuracy(model.float(), validation), "peak_rss_mib": float("nan")})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="two contenders (--only a,b) in one process, taking turns of N steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench_trainer_data"))
    cli = parser.parse_args()
    cache = Path(cli.cache)
    if cli.one and cli.interleave:
        runs = interleaved(cli.one.split(","), cli.steps, cli.batch, cache, cli.interleave)
        print("RESULT " + json.dumps(runs), flush=True)
        return
    if cli.one:
        print("RESULT " + json.dumps([one(cli.one, cli.steps, cli.batch, cache)]), flush=True)
        return

    import torch

    names = cli.only.split(",")
    load_data(cache, cli.steps * cli.batch)  # tokenize once, before any timing
    results: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(cli.repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # alternate the order too
        # one subprocess per contender, or one per repeat for an interleaved pair (the other one starts next time)
        for group in [",".join(order)] if cli.interleave else order:
            done = subprocess.run([sys.executable, __file__, "--one", group, "--steps", str(cli.steps), "--batch",
                                   str(cli.batch), "--cache", str(cache), "--interleave", str(cli.interleave)],
                                  capture_output=True, text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{group} failed:\n{done.stderr[-3000:]}")
            for run in json.loads(lines[-1].removeprefix("RESULT ")):
                results[run["name"]].append(run)
                print(f"{run['name']}: {run['seconds']:.1f} s", file=sys.stderr, flush=True)

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
              f"{'-' if cli.interleave else format(max(x['peak_rss_mib'] for x in runs), ',.0f')} | "
              f"{statistics.mean(x['accuracy'] for x in runs):.3f} | {base / seconds:.2f}x |")
    if len(names) == 2:  # the pair's ratio run by run: how much of the difference is the machine's drift
        first, second = (results[name] for name in names)
        ratios = [(b["padded"] / b["seconds"]) / (a["padded"] / a["seconds"]) for a, b in zip(first, second, strict=True)]
        print(f"\n{names[1]} / {names[0]} padded tokens/s, repeat by repeat: "
              f"{', '.join(f'{r:.3f}x' for r in ratios)} (median {statistics.median(ratios):.3f}x)")


if __name__ == "__main__":
    main()
