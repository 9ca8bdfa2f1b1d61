"""Benchmark: tokens/s and model FLOP utilisation of trainer_core on one device.

    .venv/bin/python tests/benchmarks/bench_mfu.py                           # on a GPU: BERT-base + GPT-2 124M, bf16
    .venv/bin/python tests/benchmarks/bench_mfu.py --compile                 # torch.compile (inductor), 16-token buckets
    .venv/bin/python tests/benchmarks/bench_mfu.py --small --steps 6 --peak-tflops 1   # the code path, on a CPU

MFU = 6 * N * tokens / seconds / peak, with N the model's parameters and tokens the real (attended) tokens of the
timed steps (the first --warmup steps are not timed: allocation, autotuning, compilation); peak is the device's
dense bf16 peak (H100/H200 SXM: 989 TFLOP/s) or --peak-tflops. Two workloads, random weights (MFU does not depend
on them) and synthetic token ids:
  bert   BERT-base sequence classification on MRPC-shaped pairs: lengths drawn around MRPC's (mean ~51, at most
         128 tokens), batch 32, length-grouped batches (the trainer's plan), padded per batch
  clm    GPT-2 124M causal LM on packed blocks of 1024 tokens (no padding), batch 8
Both train with trainer_core's Trainer as the flow runs it: bf16 autocast (trainer.mixed_precision=auto), fused
AdamW on CUDA, SDPA attention (transformers' default), no host sync outside logging steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
BERT_BASE = dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512)
GPT2_SMALL = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
SMALL = {"bert": dict(BERT_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
         "clm": dict(GPT2_SMALL, n_embd=64, n_layer=2, n_head=2, n_positions=128)}


def peak_tflops(cli_value: float | None) -> float | None:
    if cli_value:
        return cli_value
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def synthetic(workload: str, rows: int, block: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows as the trainer's dataloader takes them (a list of dicts: no datasets package needed on the GPU box)."""
    rng = np.random.default_rng(seed)
    if workload == "bert":  # MRPC-like pair lengths: [CLS] a [SEP] b [SEP], ~51 tokens on average
        lengths = np.clip(rng.normal(51, 14, rows).astype(int), 16, block)
        ids = [[101, *rng.integers(1000, vocab, n - 2).tolist(), 102] for n in lengths]
        labels = rng.integers(0, 2, rows).tolist()
        return [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in zip(ids, labels, strict=True)]
    return [{"input_ids": x, "attention_mask": [1] * block, "labels": x} for x in rng.integers(0, vocab, (rows, block)).tolist()]


class _Clock:
    """Times the steps after the warmup ones, and on CUDA counts each step's host-device syncs: torch's sync debug
    mode warns at every synchronizing call (.item(), a device-to-host copy, a data-dependent shape), and the
    callback books the warnings seen so far to the step that just ended (on_step_end syncs nothing itself)."""

    def __init__(self, warmup: int):
        from trainer_core.callbacks import TrainerCallback

        clock = self
        self.started, self.syncs, self._warned = None, {}, []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.syncs[state.global_step] = clock._sync_warnings() - sum(clock.syncs.values())
                if state.global_step == warmup:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    clock.started = time.perf_counter()

        self.callback = Callback()

    def _sync_warnings(self) -> int:
        return sum(_is_sync(w) for w in self._warned)

    @contextlib.contextmanager
    def counting_syncs(self):
        if not torch.cuda.is_available():
            yield
            return
        with warnings.catch_warnings(record=True) as self._warned:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for caught in self._warned:  # the others, as they would have been shown
            if not _is_sync(caught):
                warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)

    def syncing_steps(self, warmup: int, logging_steps: int) -> dict[int, int]:
        """Timed steps that are no logging steps and still synced: {step: syncs}."""
        return {step: n for step, n in self.syncs.items() if step > warmup and step % logging_steps and n}


def _is_sync(caught: warnings.WarningMessage) -> bool:
    return "synchroniz" in str(caught.message)  # "called a synchronizing CUDA operation"


def run(workload: str, cli) -> dict:
    from trainer_core.args import TrainingArguments
    from trainer_core.data import build_batch_plan
    from trainer_core.spec import ModelSpec, TaskSpec
    from trainer_core.tasks import get_task
    from trainer_core.trainer import Trainer

    family = "text_classification" if workload == "bert" else "causal_lm"
    config = (SMALL if cli.small else {"bert": BERT_BASE, "clm": GPT2_SMALL})[workload]
    batch = cli.batch or (32 if workload == "bert" else 8)
    block = 128 if workload == "bert" else min(1024, config["n_positions"])
    spec = TaskSpec(family=family, num_labels=2, max_seq_length=block, metrics=[])
    task = get_task(family)(spec)
    model = task.build_model(ModelSpec(config=dict(config)))
    params = sum(p.numel() for p in model.parameters())
    data = synthetic(workload, cli.steps * batch, block, config["vocab_size"])
    args = TrainingArguments(per_device_train_batch_size=batch, max_steps=cli.steps, learning_rate=2e-5,
                             logging_steps=cli.steps, save_strategy="no", disable_tqdm=True, mixed_precision="auto",
                             optim="adamw_torch_fused", torch_compile=cli.compile, train_sampling_strategy=(
                                 "group_by_length" if workload == "bert" else "random"))
    lengths = [len(row["input_ids"]) for row in data]
    plan = build_batch_plan(len(data), batch, 1, 0, cli.steps, seed=0, lengths=lengths,
                            group_by_length=workload == "bert", shuffle=True)
    clock = _Clock(cli.warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, args, train_dataset=data, batch_plan=plan, output_dir=out, task=task,
                          task_spec=spec, callbacks=[clock.callback])
        with clock.counting_syncs():
            trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - clock.started
        timed = [i for step in range(cli.warmup, cli.steps) for i in plan.step_range(step)]
        tokens = sum(lengths[j] for i in timed for j in plan.micro_batches[i] if j >= 0)
        result = {"workload": workload, "params_m": params / 1e6, "precision": trainer.args.mixed_precision,
                  "attention": getattr(model.config, "_attn_implementation", "?"), "tokens_per_s": tokens / seconds,
                  "step_ms": 1000 * seconds / (cli.steps - cli.warmup), "tflops": 6 * params * tokens / seconds / 1e12,
                  "syncs": clock.syncing_steps(cli.warmup, args.logging_steps) if torch.cuda.is_available() else None}
        trainer.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="bert,clm")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny configs: check the code path on a CPU")
    parser.add_argument("--peak-tflops", type=float, default=None)
    cli = parser.parse_args()
    cli.warmup = min(cli.warmup, cli.steps - 1)
    peak = peak_tflops(cli.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}; peak {peak or '?'} TFLOP/s (bf16 dense); {cli.steps - cli.warmup} timed steps after "
          f"{cli.warmup}; torch.compile {'on' if cli.compile else 'off'}\n")
    print("| workload | params (M) | precision | attention | tokens/s | step ms | model TFLOP/s | MFU | "
          "host syncs outside logging steps |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|")
    for workload in cli.workloads.split(","):
        r = run(workload, cli)
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        print(f"| {workload} | {r['params_m']:.1f} | {r['precision']} | {r['attention']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_ms']:.0f} | {r['tflops']:.2f} | {mfu} | {_syncs(r['syncs'])} |", flush=True)


def _syncs(steps: dict[int, int] | None) -> str:
    if steps is None:
        return "- (CUDA only)"
    return "none" if not steps else f"{sum(steps.values())} in steps {sorted(steps)[:8]}"


if __name__ == "__main__":
    main()
