"""A real 2-process CPU run of `python -m trainer_core.run` under accelerate launch (gloo DDP).

`accelerate launch --cpu --num_processes 2` silently runs ONE process; what really starts two on CPU is
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m trainer_core.run --spec spec.json
The run must match a 1-process run with the same global batch (the loss normalisation accounts for ranks).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_core.factories import TINY_BERT, make_dataset
from trainer_core.args import TrainingArguments
from trainer_core.callbacks import TrainerCallback
from trainer_core.data import build_batch_plan
from trainer_core.spec import ModelSpec, RunSpec, TaskSpec

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4} | {f"w{i}": i for i in range(5, 100)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(path)


class HardKill(TrainerCallback):
    """Kills the process like SIGKILL would (no cleanup), in the middle of an accumulation window."""

    def __init__(self, step):
        self.step = step

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(17)


def _spec(tmp_path, name, world_size, dropout=0.0, callbacks=()):
    import datasets

    data_dir = tmp_path / "data"
    if not data_dir.exists():
        datasets.DatasetDict({"train": make_dataset(37, seed=1), "validation": make_dataset(13, seed=2)}).save_to_disk(
            str(data_dir))
        _tokenizer(tmp_path / "tokenizer")
    args = TrainingArguments(
        per_device_train_batch_size=8 // world_size, gradient_accumulation_steps=2, max_steps=6, learning_rate=1e-2,
        logging_steps=1, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3, disable_tqdm=True,
        log_level_replica="info", seed=5, callbacks=list(callbacks),
    )
    plan = build_batch_plan(37, 8, 2, 0, 6, seed=5)
    plan.save(tmp_path / name / "plan.npz")
    spec = RunSpec(
        args=args, task=TaskSpec(metrics=["accuracy", "f1"]), model=ModelSpec(config=dict(TINY_BERT), dropout=dropout),
        dataset_dir=str(data_dir), tokenizer_dir=str(tmp_path / "tokenizer"), plan_path=str(tmp_path / name / "plan.npz"),
        output_dir=str(tmp_path / name / "out"), config_hash="h1",
    )
    path = tmp_path / name / "spec.json"
    path.write_text(json.dumps(dataclasses.asdict(spec)))
    return spec, path


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _launch_two(spec_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer_core.run", "--spec", str(spec_path)],
        env=_env() | {"ACCELERATE_USE_CPU": "true"}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_two_process_cpu_run_matches_one_process(tmp_path):
    spec2, path2 = _spec(tmp_path, "two", world_size=2)
    two = _launch_two(path2)
    assert two.returncode == 0, two.stderr[-4000:]
    log = two.stdout + two.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] INFO trainer_core: rank {rank}/2: world_size=2" in log, log[-3000:]
    shards = {int(m.group(1)): json.loads(m.group(2))
              for m in re.finditer(r"rank (\d)/2: first batch sample indices (\[[^\]]*\])", log)}
    assert len(shards[0]) == len(shards[1]) == 4 and not set(shards[0]) & set(shards[1])

    spec1, path1 = _spec(tmp_path, "one", world_size=1)
    one = subprocess.run([sys.executable, "-m", "trainer_core.run", "--spec", str(path1)], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "rank 0/1: world_size=1" in one.stdout + one.stderr

    out2, out1 = Path(spec2.output_dir), Path(spec1.output_dir)
    assert (out2 / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (out2 / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert sorted(p.name for p in (out2 / "checkpoints" / "step-00000003").glob("rng_state_*")) == [
        "rng_state_0.json", "rng_state_1.json"]
    result = json.loads((out2 / "final" / "train_result.json").read_text())
    assert result["global_step"] == 6
    # same global batches, same weights (up to the all-reduce's float32 summation order)
    w2, w1 = load_file(str(out2 / "final" / "model.safetensors")), load_file(str(out1 / "final" / "model.safetensors"))
    for name, value in w1.items():
        torch.testing.assert_close(w2[name], value, atol=1e-5, rtol=0, msg=name)
    lines2 = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    lines1 = [json.loads(x) for x in (out1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines2] == [r["step"] for r in lines1] == [1, 2, 3, 3, 4, 5, 6, 6]
    for a, b in zip(lines2, lines1, strict=True):
        for key, value in b["metrics"].items():
            assert a["metrics"][key] == pytest.approx(value, abs=1e-5), key


def test_two_process_hard_kill_and_relaunch_equals_uninterrupted(tmp_path):
    # dropout and shuffling on; killed in the middle of step 5's accumulation window (last checkpoint: step 3)
    spec_ref, path_ref = _spec(tmp_path, "ref", world_size=2, dropout=0.1)
    assert _launch_two(path_ref).returncode == 0
    kill = {"_target_": "tests.trainer_core.test_launch.HardKill", "step": 4}
    spec_run, path_killed = _spec(tmp_path, "run", world_size=2, dropout=0.1, callbacks=[kill])
    killed = _launch_two(path_killed)
    assert killed.returncode != 0
    out = Path(spec_run.output_dir)
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    # the relaunch (what a Prefect retry does): same spec without the kill
    _, path_relaunch = _spec(tmp_path, "run", world_size=2, dropout=0.1)
    relaunch = _launch_two(path_relaunch)
    assert relaunch.returncode == 0, relaunch.stderr[-4000:]
    assert "Resuming from checkpoint" in relaunch.stderr + relaunch.stdout
    ref = load_file(str(Path(spec_ref.output_dir) / "final" / "model.safetensors"))
    got = load_file(str(out / "final" / "model.safetensors"))
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6]
