"""Where one training step of the default model goes: the same-settings step (fp32) by phase and by operator.

    .venv/bin/python tests/benchmarks/bench_step.py                 # batch 32 x 27 tokens (the default data's mean)

MiniLM-L6 with a classification head (the default run's model), one CPU process, fused AdamW, clipping at 1.0:
the step that transformers.Trainer and trainer_core both run. Prints the median milliseconds of forward, backward,
clipping, optimizer step and zero_grad over 20 steps, then torch.profiler's operators over 5 more by self CPU time.
No trainer runs here: these are the operators both trainers share. What a trainer adds around them is measured by
`bench_trainer.py --interleave`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import pairwise

from bench_trainer import HYPER, initial_model  # its set-up: offline, the repo on sys.path, the same initial weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=27)
    parser.add_argument("--steps", type=int, default=20)
    cli = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from flows.config import compose
    from stages.common import resolve_model_path

    model = initial_model(resolve_model_path(compose([]).model)).train()  # the default run's model (its PyPI wheel)
    batch = {"input_ids": torch.randint(1000, 20000, (cli.batch, cli.length)),
             "attention_mask": torch.ones(cli.batch, cli.length, dtype=torch.long),
             "labels": torch.randint(0, 2, (cli.batch,))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=HYPER["learning_rate"], weight_decay=HYPER["weight_decay"],
                                  fused=True)

    def step() -> list[float]:
        marks = [time.perf_counter()]
        loss = model(**batch).loss
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["max_grad_norm"])
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return [(b - a) * 1000 for a, b in pairwise(marks)]

    for _ in range(3):  # warm-up
        step()
    phases = list(zip(*(step() for _ in range(cli.steps)), strict=True))
    names = ("forward", "backward", "clip_grad_norm", "optimizer.step", "zero_grad")
    medians = [statistics.median(p) for p in phases]
    print(f"\nMiniLM-L6, batch {cli.batch} x {cli.length} tokens, fp32, {torch.get_num_threads()} threads, "
          f"median of {cli.steps} steps: {sum(medians):.0f} ms per step\n")
    print("| phase | ms | share |\n|---|---:|---:|")
    for name, ms in zip(names, medians, strict=True):
        print(f"| {name} | {ms:.1f} | {ms / sum(medians):.1%} |")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
