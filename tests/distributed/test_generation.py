"""Generate-based evaluation on 2 gloo ranks scores what 1 process scores: DDP, FSDP2 and DeepSpeed ZeRO-3.

    .venv/bin/python -m pytest tests/distributed/test_generation.py -m integration

seq2seq (a tiny T5, ROUGE / sacreBLEU / chrF / gen_len) and causal_lm with task.options.generate_eval (a tiny
GPT-2, exact_match / rougeL of greedy continuations). Each model is first trained a little in this process (so
the texts it generates overlap the references and stop at different lengths), saved, then every topology runs
trainer_core.run from it: one optimizer step at learning rate 1e-12 (the fp32 weights do not move), evaluation
with `generate` at that step. Per rank 3 samples per eval batch on 11 validation samples: the last global batch
of 2 ranks holds 5 real samples and 1 duplicate that gather_for_metrics must drop.

Under FSDP2 and ZeRO-3 every rank holds half of each parameter: each forward of `generate` all-gathers them,
so the ranks step together (`synced_gpus`) until both are done, a rank with a finished batch running dummy steps.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from stages.launch import distributed_spec
from tests.distributed.helpers import hardware_of, launch, metrics_of
from trainer_core.args import TrainingArguments
from trainer_core.data import build_batch_plan
from trainer_core.spec import ModelSpec, RunSpec, TaskSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # 14 processes on 2 shared cores

CPU = ["hardware=cpu"]
DDP = ["hardware=ddp_2cpu"]
FSDP = ["hardware=fsdp_2gpu", "hardware.use_cpu=true"]
ZERO3 = ["hardware=deepspeed_zero3", "hardware.use_cpu=true"]
TOPOLOGIES = {"cpu": CPU, "ddp": DDP, "fsdp": FSDP, "zero3": ZERO3}

EVAL_SAMPLES = 11
EVAL_BATCH = 3
"""Per-device eval batch: 11 samples on 2 ranks x 3 leave one padding duplicate in the last global batch."""

TINY_T5 = {"model_type": "t5", "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
SEQ2SEQ = TaskSpec(family="seq2seq", columns={"source": "article", "target": "highlights"},
                   metrics=["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "gen_len"], max_seq_length=48,
                   options={"source_prefix": "summarize: ", "max_target_length": 12, "generation_max_length": 8})
CAUSAL_LM = TaskSpec(family="causal_lm", columns={"text": "text"}, num_labels=1,
                     metrics=["perplexity", "exact_match", "rougeL"], max_seq_length=24,
                     options={"block_size": 24, "generate_eval": True, "max_new_tokens": 5})
GENERATION_METRICS = {"seq2seq": ["eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_bleu",
                                  "eval_chrf", "eval_gen_len"],
                      "causal_lm": ["eval_exact_match", "eval_rougeL"]}


def _headlines(count: int, seed: int) -> dict[str, list[str]]:
    """Article -> headline pairs of a small grammar (the headline restates the lead, more or less of it)."""
    rng = random.Random(seed)
    subjects, verbs = "council team storm market school river".split(), "approved closed opened won raised".split()
    objects, times = "park road plan final budget".split(), "Monday Friday today".split()
    rows: dict[str, list[str]] = {"article": [], "highlights": []}
    for _ in range(count):
        s, v, o, t = rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(times)
        rows["article"].append(f"The {s} {v} the {o} {t}. The {rng.choice(subjects)} {rng.choice(verbs)} a plan.")
        rows["highlights"].append(f"{s.capitalize()} {v} {o}" + (f" {t}." if rng.random() < 0.5 else "."))
    return rows


def _pretrain(model, features, collate, family, steps: int, lr: float) -> None:
    """A few hundred tiny Adam steps in this process: enough for texts that overlap the references."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    rows = [{k: r[k] for k in ("input_ids", "attention_mask", "labels") if k in r} for r in features]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only spins on a loaded machine
    try:
        for step in range(steps):
            batch = collate([rows[(step * 8 + i) % len(rows)] for i in range(8)])
            inputs, targets = family.split_batch(batch)
            loss = family.loss(model(**inputs), targets).sum() / family.count_items(targets).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _prepare(root: Path, spec: TaskSpec):
    """Tokenizer, tokenized train / validation splits on disk and the pretrained model folder of one family."""
    import datasets

    from tests.tasks.lm_data import documents
    from trainer_core.tasks import get_task

    family = get_task(spec.family)(spec)
    if spec.family == "seq2seq":
        from stages.tokenizers_seq2seq import train_seq2seq_tokenizer

        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(_headlines(48, seed=1)),
                                    "validation": datasets.Dataset.from_dict(_headlines(EVAL_SAMPLES, seed=2))})
        tokenizer = train_seq2seq_tokenizer(family.tokenizer_texts(raw["train"]), vocab_size=200)
        config, steps, lr = TINY_T5, 150, 1e-2
    else:
        from stages.tokenizers import train_bpe

        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": documents(40, seed=1)}),
                                    "validation": datasets.Dataset.from_dict({"text": documents(30, seed=2)})})
        tokenizer = train_bpe(family.tokenizer_texts(raw["train"]), vocab_size=300)
        config, steps, lr = TINY_GPT2, 200, 1e-2
    keep = set(family.kept_raw_columns())
    features = raw.map(family.preprocess(tokenizer), batched=True, with_indices=True,
                       remove_columns=[c for c in raw["train"].column_names if c not in keep])
    if spec.family == "causal_lm":  # blocks, not rows: keep 11 of them
        features["validation"] = features["validation"].select(range(EVAL_SAMPLES))
    assert len(features["validation"]) == EVAL_SAMPLES
    features.save_to_disk(str(root / "data"))
    tokenizer.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    model = family.build_model(ModelSpec(config={**config, "vocab_size": len(tokenizer)}, dropout=0.0))
    _pretrain(model, features["train"], family.collator(tokenizer, model), family, steps, lr)
    model.save_pretrained(str(root / "init"))
    return family, tokenizer, model, features


def _run_spec(root: Path, spec: TaskSpec, name: str, world_size: int, distributed: dict) -> tuple[RunSpec, Path]:
    """One step at learning rate 1e-12 (the weights stay bitwise as saved), then evaluation with generate."""
    args = TrainingArguments(
        per_device_train_batch_size=4 // world_size, per_device_eval_batch_size=EVAL_BATCH, max_steps=1,
        learning_rate=1e-12, logging_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="no",
        disable_tqdm=True, log_level_replica="warning", seed=0,
        predict_with_generate=True if spec.family == "seq2seq" else None,  # causal_lm: task.options.generate_eval
    )
    import datasets

    train_rows = len(datasets.load_from_disk(str(root / "data"))["train"])
    (root / name).mkdir(parents=True, exist_ok=True)
    build_batch_plan(train_rows, 4, 1, 0, 1, seed=0).save(root / name / "plan.npz")
    run = RunSpec(args=args, task=spec, model=ModelSpec(name_or_path=str(root / "init"), dropout=0.0),
                  dataset_dir=str(root / "data"), tokenizer_dir=str(root / "tokenizer"),
                  plan_path=str(root / name / "plan.npz"), output_dir=str(root / name / "out"), config_hash="gen",
                  distributed=distributed)
    path = root / name / "spec.json"
    path.write_text(run.to_json())
    return run, path


def _eval_metrics(run: RunSpec) -> dict[str, float]:
    records = [r["metrics"] for r in metrics_of(Path(run.output_dir)) if "eval_loss" in r["metrics"]]
    assert len(records) == 1, records
    return records[0]


@pytest.fixture(scope="module")
def generation_runs(tmp_path_factory):
    """Both families, each on every topology, all launched at once (14 processes: minutes on 2 shared cores)."""
    assert EVAL_SAMPLES % (2 * EVAL_BATCH) != 0  # the uneven last batch this module is about
    prepared, procs, runs = {}, {}, {}
    for spec in (SEQ2SEQ, CAUSAL_LM):
        root = tmp_path_factory.mktemp(spec.family)
        prepared[spec.family] = _prepare(root, spec)
        for name, overrides in TOPOLOGIES.items():
            world = 1 if name == "cpu" else 2
            distributed = distributed_spec(hardware_of(overrides)) if name in ("fsdp", "zero3") else {}
            runs[spec.family, name] = _run_spec(root, spec, name, world, distributed)
            procs[spec.family, name] = launch(overrides, runs[spec.family, name][1], background=True)
    logs = {key: proc.communicate(timeout=600)[0] for key, proc in procs.items()}
    for key, proc in procs.items():
        assert proc.returncode == 0, (key, logs[key][-4000:])
    return {key: _eval_metrics(run) for key, (run, _) in runs.items()}, prepared, {k: p for k, (_, p) in runs.items()}


def _reference_metrics(family, tokenizer, model, validation, duplicate_first: bool = False) -> dict[str, float]:
    """What one process computes in batches of 3 (optionally with the padding duplicate left in)."""
    from trainer_core.evaluation import concat_padded

    rows = list(range(EVAL_SAMPLES)) + ([0] if duplicate_first else [])
    collate = family.collator(tokenizer, model)
    columns = [c for c in validation.column_names if c in family.dataset_columns()]
    outputs, targets = {}, {}
    with torch.no_grad():
        for start in range(0, len(rows), EVAL_BATCH):
            batch = collate([{c: validation[i][c] for c in columns} for i in rows[start:start + EVAL_BATCH]])
            inputs, batch_targets = family.split_batch(batch)
            for store, tensors in ((outputs, family.eval_step(model, inputs, batch_targets).outputs),
                                   (targets, batch_targets)):
                for name, tensor in tensors.items():
                    store.setdefault(name, []).append(tensor.cpu().numpy())
    predictions = {k: concat_padded(v) for k, v in outputs.items()}
    references = {k: concat_padded(v) for k, v in targets.items()}
    return {f"eval_{k}": v for k, v in family.compute_metrics(predictions, references, validation).items()}


@pytest.mark.parametrize("family_name", ["seq2seq", "causal_lm"])
def test_one_process_run_scores_what_this_process_computes(generation_runs, family_name):
    """The launched 1-process run against an in-process evaluation of the same weights, and the duplicate
    matters: scoring it too would change the metrics (so the 2-rank comparisons below can fail)."""
    metrics, prepared, _ = generation_runs
    family, tokenizer, model, features = prepared[family_name]
    expected = _reference_metrics(family, tokenizer, model, features["validation"])
    with_duplicate = _reference_metrics(family, tokenizer, model, features["validation"], duplicate_first=True)
    names = GENERATION_METRICS[family_name]
    for name in names:
        assert metrics[family_name, "cpu"][name] == pytest.approx(expected[name], abs=1e-9), name
    # texts that overlap the references (and, for seq2seq, stop at different lengths): a non-vacuous comparison
    assert max(expected[n] for n in names if n != "eval_gen_len") > 0.1, expected
    assert any(expected[n] != with_duplicate[n] for n in names), (expected, with_duplicate)


@pytest.mark.parametrize("topology", ["ddp", "fsdp", "zero3"])
@pytest.mark.parametrize("family_name", ["seq2seq", "causal_lm"])
def test_two_ranks_score_what_one_process_scores(generation_runs, family_name, topology):
    metrics, _, spec_paths = generation_runs
    folder = spec_paths[family_name, topology].parent
    launcher = yaml.safe_load((folder / "accelerate.yaml").read_text())
    requested = json.loads((folder / "spec.json").read_text())["distributed"].get("distributed_type")
    # what ran: plain DDP ranks (FSDP2 applied by trainer_core, told by the spec), or DeepSpeed at stage 3
    assert (launcher["distributed_type"], requested) == {"ddp": ("MULTI_GPU", None), "fsdp": ("MULTI_GPU", "FSDP"),
                                                         "zero3": ("DEEPSPEED", "DEEPSPEED")}[topology]
    if topology == "zero3":
        assert launcher["deepspeed_config"]["zero_stage"] == 3
    one, two = metrics[family_name, "cpu"], metrics[family_name, topology]
    # generated texts are the same on every topology: their metrics too, to the last digit
    for name in GENERATION_METRICS[family_name]:
        assert two[name] == one[name], (name, two[name], one[name])
    # the teacher-forced loss only differs by the order of the sums over the ranks
    assert math.isclose(two["eval_loss"], one["eval_loss"], rel_tol=1e-5)
