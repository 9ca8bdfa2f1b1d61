"""Label smoothing, NEFTune and class weights do what their formulas say."""

import copy

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.trainer_core.factories import make_trainer, tiny_model
from trainer_core.callbacks import TrainerCallback
from trainer_core.losses import WeightedCrossEntropy
from trainer_core.tasks import get_task


def test_label_smoothing_formula():
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0]), 0.2
    log_probs = logits.log_softmax(-1)
    nll = -log_probs[torch.arange(6), labels]
    # (1 - eps) * NLL + eps * mean over classes of -log p (transformers' LabelSmoother)
    expected = (1 - eps) * nll + eps * (-log_probs.mean(-1))
    got = get_task("text_classification").loss_per_example(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(got, expected)


def test_label_smoothing_used_by_trainer(tmp_path):
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.classifier.weight.mul_(300.0)  # confident logits: smoothing and plain CE then differ clearly
    trainer = make_trainer(tmp_path, model=model, max_steps=1, label_smoothing_factor=0.3)
    metrics = trainer.evaluate()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    log_probs = logits.log_softmax(-1)
    expected = (0.7 * -log_probs[torch.arange(len(labels)), labels] + 0.3 * -log_probs.mean(-1)).mean()
    assert abs(metrics["eval_loss"] - float(expected)) < 1e-5
    assert abs(metrics["eval_loss"] - float(F.cross_entropy(logits, labels))) > 1e-3


class ProbeNoise(TrainerCallback):
    """During training: are two train-mode forwards different (noise) and two eval-mode ones equal?"""

    def __init__(self, batch):
        self.batch, self.train_differs, self.eval_equal = batch, None, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                model.train()
                self.train_differs = not torch.equal(model(**self.batch).logits, model(**self.batch).logits)
                model.eval()
                self.eval_equal = torch.equal(model(**self.batch).logits, model(**self.batch).logits)
                model.train()


def test_neftune_noise_only_in_training(tmp_path):
    base = tiny_model(dropout=0.0, seed=3)
    plain = make_trainer(tmp_path / "plain", model=copy.deepcopy(base), max_steps=4)
    plain.train()
    noisy_trainer = make_trainer(tmp_path / "noisy", model=copy.deepcopy(base), max_steps=4, neftune_noise_alpha=5.0)
    batch = noisy_trainer.data_collator([noisy_trainer.eval_dataset[i] for i in range(4)])
    batch.pop("labels")
    probe = ProbeNoise(batch)
    noisy_trainer.callback_handler.add(probe)
    noisy_trainer.train()

    assert probe.train_differs and probe.eval_equal
    noisy = noisy_trainer.accelerator.unwrap_model(noisy_trainer.model)
    plain_model = plain.accelerator.unwrap_model(plain.model)
    # the noise changed training ...
    assert not torch.equal(noisy.classifier.weight, plain_model.classifier.weight)
    # ... but the hook is gone afterwards: deterministic train-mode outputs, clean saved embeddings
    assert not noisy.get_input_embeddings()._forward_hooks
    noisy.train()
    with torch.no_grad():
        assert torch.equal(noisy(**batch).logits, noisy(**batch).logits)
    a, b = noisy_trainer.evaluate(), noisy_trainer.evaluate()
    assert a["eval_loss"] == b["eval_loss"]
    final = noisy_trainer.save_final()
    saved = load_file(str(final / "model.safetensors"))
    assert torch.equal(saved["bert.embeddings.word_embeddings.weight"], noisy.get_input_embeddings().weight)


def test_class_weights_scale_gradients():
    torch.manual_seed(0)
    logits = torch.randn(8, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    WeightedCrossEntropy([1.0, 3.0])(logits, labels).sum().backward()
    weighted = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits, labels, reduction="sum").backward()
    plain = logits.grad
    for i, label in enumerate(labels.tolist()):
        torch.testing.assert_close(weighted[i], plain[i] * (3.0 if label == 1 else 1.0))


def test_class_weights_through_config(tmp_path):
    # with SGD, uniform weights of 2 are exactly a learning rate twice as large
    base = tiny_model(dropout=0.0, seed=3)
    common = dict(max_steps=3, lr_scheduler_type="constant", max_grad_norm=0.0, optimizer={"_target_": "torch.optim.SGD"})
    weighted = make_trainer(tmp_path / "w", model=copy.deepcopy(base), learning_rate=0.05,
                            loss={"_target_": "trainer_core.losses.WeightedCrossEntropy", "class_weights": [2.0, 2.0]},
                            **common)
    doubled = make_trainer(tmp_path / "d", model=copy.deepcopy(base), learning_rate=0.1, **common)
    uneven = make_trainer(tmp_path / "u", model=copy.deepcopy(base), learning_rate=0.05,
                          loss={"_target_": "trainer_core.losses.WeightedCrossEntropy", "class_weights": [1.0, 3.0]},
                          **common)
    for trainer in (weighted, doubled, uneven):
        trainer.train()
    w, d, u = (t.accelerator.unwrap_model(t.model).state_dict() for t in (weighted, doubled, uneven))
    for name in w:
        torch.testing.assert_close(w[name], d[name], atol=1e-6, rtol=0)
    assert not torch.allclose(u["classifier.weight"], w["classifier.weight"])
