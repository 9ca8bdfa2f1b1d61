"""trainer_core.run in-process: train from a spec, then build_trainer on final/ to predict (evaluate stage)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.trainer_core.test_launch import _spec
from trainer_core.checkpoint import load_weights, save_weights
from trainer_core.run import build_trainer, main


def test_run_then_predict_on_final(tmp_path):
    import datasets

    spec, path = _spec(tmp_path, "one", world_size=1)
    assert main(["--spec", str(path)]) == 0
    final = Path(spec.output_dir) / "final"
    assert {"config.json", "model.safetensors", "train_result.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    result = json.loads((final / "train_result.json").read_text())
    assert result["global_step"] == 6 and result["training_loss"] > 0 and result["config_hash"] == "h1"

    scorer = build_trainer(spec, model_dir=final)
    validation = datasets.load_from_disk(spec.dataset_dir)["validation"]
    out = scorer.predict(validation)
    assert out.predictions.shape == (13, 2) and out.num_samples == 13
    assert np.array_equal(out.label_ids, np.array(validation["labels"]))
    # the scorer holds the trained weights: its loss is the one logged at the last evaluation
    last_eval = [json.loads(x) for x in (Path(spec.output_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(out.metrics["test_loss"] - last_eval["metrics"]["eval_loss"]) < 1e-6
    assert set(out.metrics) == {"test_loss", "test_accuracy", "test_f1"}
    assert not (Path(spec.output_dir) / "checkpoints" / "step-00000007").exists()


def test_a_run_without_deepspeed_never_imports_it(tmp_path):
    """Accelerate's unwrap_model imports deepspeed (~1 s per rank) wherever it is installed; a plain run has no
    engine to unwrap. A fresh interpreter: trains, checkpoints, saves final/, and never imports it."""
    assert importlib.util.find_spec("deepspeed") is not None  # installed here, or this test proves nothing
    spec, path = _spec(tmp_path, "one", world_size=1)
    script = ("import sys; from trainer_core.run import main; code = main(['--spec', sys.argv[1]]); "
              "print(code, 'deepspeed' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr[-2000:]
    assert (Path(spec.output_dir) / "final" / "model.safetensors").is_file()
    assert any((Path(spec.output_dir) / "checkpoints").iterdir())


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    save_weights(model.state_dict(), tmp_path / "model.safetensors")
    other = Tied()
    load_weights(other, tmp_path / "model.safetensors")
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.head.weight is other.embed.weight


def test_relaunch_after_completion_is_a_no_op(tmp_path):
    spec, path = _spec(tmp_path, "one", world_size=1)
    assert main(["--spec", str(path)]) == 0
    final = Path(spec.output_dir) / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    assert main(["--spec", str(path)]) == 0
    assert final.stat().st_mtime_ns == stamp


def test_bf16_on_cpu_trains(tmp_path):
    # decision: bf16 is allowed on CPU (torch autocasts to bf16 there); a later fp32 trainer in the same process
    # must still work, although Accelerate's state is process-wide
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tests.trainer_core.factories import make_trainer

    bf16 = make_trainer(tmp_path / "bf16", max_steps=2, mixed_precision="bf16")
    assert bf16.accelerator.mixed_precision == "bf16"
    assert bf16.train().global_step == 2
    fp32 = make_trainer(tmp_path / "fp32", max_steps=1)
    assert fp32.accelerator.mixed_precision == "no"
    assert fp32.train().global_step == 1
