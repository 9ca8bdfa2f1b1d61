"""Our Trainer against transformers.Trainer: same model, data and order -> same per-step loss and weights.

Tolerance: atol 1e-6 on losses and weights. Both sides run the same float32 kernels on the same batches; the only
differences are the order of a few reductions (HF averages per micro-batch, we sum then divide by the window's
items), which moves results by a few float32 ulps (~1e-7 here), far below any real bug (a missed accumulation
scale, a wrong decay group or a skewed schedule move weights by >1e-4 in a few steps).

transformers 5.23 with accumulation: BertForSequenceClassification.forward takes **kwargs, so HF counts
`num_items_in_batch`, passes it to the model and skips its own division by gradient_accumulation_steps, but the
model's classification loss ignores it (a mean per micro-batch): HF then reports and steps on a loss 4x too large
(checked: 2.78 instead of 0.695 at step 1). The documented fix is `compute_loss_func` (sum / num_items_in_batch),
which is what we implement, so the accumulation config gives HF that hook.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler

from tests.trainer_core.factories import make_dataset, tiny_model
from trainer_core.args import TrainingArguments
from trainer_core.data import build_batch_plan
from trainer_core.spec import TaskSpec
from trainer_core.trainer import Trainer

ATOL = 1e-6


def _hf_run(model, dataset, tmp_path, *, max_steps, batch, accumulation, warmup_steps=0, max_grad_norm=0.0,
            weight_decay=0.0, custom_loss=False):
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    from trainer_core.tasks import get_task

    class SequentialHFTrainer(HFTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def sum_over_items(outputs, labels, num_items_in_batch=None):
        # the documented compute_loss_func hook: sum-reduced CE over the items of the accumulation window
        return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    args = HFArgs(
        output_dir=str(tmp_path / "hf"), use_cpu=True, report_to=[], per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=max_steps, learning_rate=5e-3, weight_decay=weight_decay,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, logging_steps=1, save_strategy="no",
        optim="adamw_torch", lr_scheduler_type="linear", disable_tqdm=True, seed=0,
    )
    trainer = SequentialHFTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=get_task("text_classification")(TaskSpec()).collator(None),
        compute_loss_func=sum_over_items if custom_loss else None,
    )
    trainer.train()
    return _logged(trainer.state.log_history), trainer.model


def _logged(history):
    return {key: [h[key] for h in history if "loss" in h] for key in ("loss", "learning_rate", "grad_norm")}


def _our_run(model, dataset, tmp_path, *, max_steps, batch, accumulation, warmup_steps=0, max_grad_norm=0.0,
             weight_decay=0.0):
    args = TrainingArguments(
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=max_steps,
        learning_rate=5e-3, weight_decay=weight_decay, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )
    plan = build_batch_plan(len(dataset), batch, accumulation, 0, max_steps, seed=0, shuffle=False)
    trainer = Trainer(model, args, train_dataset=dataset, batch_plan=plan, output_dir=tmp_path / "ours",
                      task_spec=TaskSpec(metrics=[]))
    trainer.train()
    return _logged(trainer.state.log_history), trainer.accelerator.unwrap_model(trainer.model)


@pytest.mark.parametrize(
    "config",
    [
        # plain: 44 samples / batch 8 -> a short last batch every epoch, 2 epochs
        dict(max_steps=11, batch=8, accumulation=1),
        # accumulation over an uneven epoch end (6 micro-batches / 4 -> steps of 4 and 2), warmup, clipping, decay
        dict(max_steps=6, batch=8, accumulation=4, warmup_steps=2, max_grad_norm=0.5, weight_decay=0.1),
    ],
    ids=["plain", "accumulation-warmup-clip-decay"],
)
def test_matches_transformers_trainer(tmp_path, config):
    dataset = make_dataset(44, seed=3)
    base = tiny_model(dropout=0.0, seed=1)
    hf_losses, hf_model = _hf_run(copy.deepcopy(base), dataset, tmp_path, custom_loss=config["accumulation"] > 1,
                                  **config)
    our_losses, our_model = _our_run(copy.deepcopy(base), dataset, tmp_path, **config)

    assert len(our_losses["loss"]) == len(hf_losses["loss"]) == config["max_steps"]
    assert our_losses["loss"] == pytest.approx(hf_losses["loss"], abs=ATOL)
    # same schedule (warmup, linear decay, logged after the step like HF) and the same pre-clipping norm
    assert our_losses["learning_rate"] == pytest.approx(hf_losses["learning_rate"], abs=1e-12)
    assert our_losses["grad_norm"] == pytest.approx(hf_losses["grad_norm"], abs=1e-5)
    hf_state, our_state = hf_model.state_dict(), our_model.state_dict()
    assert hf_state.keys() == our_state.keys()
    moved = 0.0
    for name, value in our_state.items():
        torch.testing.assert_close(value, hf_state[name], atol=ATOL, rtol=0, msg=name)
        moved = max(moved, float((value - base.state_dict()[name]).abs().max()))
    assert moved > 1e-3  # the weights did train: equality is not vacuous


@pytest.mark.parametrize("kind,kwargs", [
    ("linear", {}), ("cosine", {"num_cycles": 0.25}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-6}), ("constant", {}), ("constant_with_warmup", {}),
])
@pytest.mark.parametrize("warmup_steps", [0, 0.1, 0.33, 4])
def test_schedule_matches_transformers_trainer(tmp_path, kind, kwargs, warmup_steps):
    # what transformers.Trainer.create_scheduler builds from the same arguments: the same rate at every step
    from transformers import TrainingArguments as HFArgs
    from transformers import get_scheduler

    from trainer_core.args import SCHEDULERS
    from trainer_core.optim import build_scheduler

    assert kind in SCHEDULERS
    steps = 23
    args = TrainingArguments(learning_rate=1e-3, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs,
                             warmup_steps=warmup_steps)
    hf_args = HFArgs(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=1e-3,
                     lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, warmup_steps=warmup_steps)
    ours_opt, theirs_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2))
    ours = build_scheduler(ours_opt, args, num_steps=steps)
    theirs = get_scheduler(kind, theirs_opt, num_warmup_steps=hf_args.get_warmup_steps(steps),
                           num_training_steps=steps, scheduler_specific_kwargs=hf_args.lr_scheduler_kwargs)
    for _ in range(steps):
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours_opt.step(), theirs_opt.step()
        ours.step(), theirs.step()


def test_decay_groups_match_transformers_trainer():
    # no weight decay for biases and norms (LayerNorm modules, RMSNorm by name): transformers.Trainer's own rule
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import Trainer as HFTrainer

    from trainer_core.optim import build_optimizer

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=100))
    for model in (tiny_model(), llama):
        expected = set(HFTrainer.get_decay_parameter_names(None, model))
        assert any("norm" in n.lower() for n, _ in model.named_parameters() if n not in expected)
        decay, no_decay = build_optimizer(model, TrainingArguments(weight_decay=0.1)).param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert {names[id(p)] for p in decay["params"]} == expected
        assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - expected
