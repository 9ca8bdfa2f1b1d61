"""The task-family contract: what every module under trainer_core/tasks/ implements, and nothing else knows.

    from trainer_core.tasks import get_task
    family = get_task("text_classification")(task_spec)      # one TaskFamily subclass per module
    model = family.build_model(model_spec)

A family is one subclass of `TaskFamily` in its own module (found by discovery: adding a family is adding a
module here and a YAML under conf/task/). Along the pipeline it answers, in this order:

    config     roles, Options, config_errors()            which raw columns it reads, its task.options keys
    data       check_raw(), preprocess(tokenizer)          raw rows -> features (several per example allowed),
                                                            each feature keeps its `example_id`
    model      build_model(), collator(tokenizer, model)   the Auto class it needs, padding (may need the model)
    training   split_batch(), loss(), count_items()        loss per example [B] and items per example [B]: the
                                                            trainer normalises by the items of the whole window
    evaluation eval_step()                                 forward or generate -> small tensors (ids, spans,
                                                            class logits), never [N, L, V] logits
               postprocess(), compute_metrics()            features -> one record per example -> metrics
    serving    serving_meta(), serving_schema(), input_example(), load_for_serving(), serve()
                                                            the registered pyfunc's signature and predict

Nothing outside a family module reads `.logits`, label shapes, text columns or label/score schemas.
This module imports no torch or transformers at import time: the config is validated with it in a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import torch

    from trainer_core.spec import ModelSpec, TaskSpec

IGNORE_INDEX = -100
"""Label value that no loss and no metric counts (padding, sub-tokens without a label)."""


@dataclass
class NoOptions:
    """A family without options of its own (task.options must stay empty)."""


class EvalStep(NamedTuple):
    """What one evaluation batch gives back, per example of the batch."""

    loss: torch.Tensor | None
    """Loss of each example, summed over its items [B]; None without targets."""
    items: torch.Tensor | None
    """Loss items of each example [B] (1, or its labelled tokens)."""
    outputs: dict[str, torch.Tensor]
    """Small tensors [B, ...]: class logits, token ids, span indices."""


class TaskFamily:
    """Base of every task family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    """The `task.family` value (also the module's name)."""
    roles: ClassVar[dict[str, bool]] = {}
    """Raw-column roles it reads -> whether the role is required (e.g. text: True, text_pair: False)."""
    model_input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    """Feature columns the model's forward takes."""
    target_names: ClassVar[tuple[str, ...]] = ("labels",)
    """Feature columns the loss reads (not passed to forward)."""
    feature_names: ClassVar[tuple[str, ...]] = ()
    """Other feature columns kept for post-processing (e.g. QA offsets), never collated into a batch."""
    Options: ClassVar[type] = NoOptions
    """Dataclass of the family's own `task.options` keys (validated when the config is composed)."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """Metrics this family can compute (task.metrics picks among them)."""
    sequence_outputs: ClassVar[tuple[str, ...]] = ()
    """Eval outputs and targets with a sequence dimension (dim 1): padded with IGNORE_INDEX across batches/ranks."""
    prediction_key: ClassVar[str] = "logits"
    """The eval output that Trainer.predict returns as `predictions` (and preprocess_logits_for_metrics sees)."""
    has_length: ClassVar[bool] = True
    """Inputs have a token length: train_sampling_strategy=group_by_length and NEFTune make sense."""
    generates: ClassVar[bool] = False
    """Evaluation can run `generate` (trainer.predict_with_generate applies)."""
    greater_is_better: ClassVar[dict[str, bool]] = {"loss": False, "perplexity": False}
    """Direction of metrics where lower is better; metrics not listed are higher-is-better."""

    def __init__(self, spec: TaskSpec, *, label_smoothing: float = 0.0, loss_hook: Callable | None = None):
        self.spec = spec
        self.options = self.Options(**spec.options)
        self.label_smoothing = label_smoothing
        self.loss_hook = loss_hook
        """`trainer.loss` (`_target_`): called as loss_hook(logits, labels) -> [B], replacing the family's loss."""

    # --- config --------------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, spec: TaskSpec) -> list[str]:
        """Every problem of a task config for this family, as 'key: what is wrong and the fix' (no I/O)."""
        errors = []
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        for key in spec.options:
            if key not in known:
                choices = ", ".join(known) or "none (leave task.options empty)"
                errors.append(f"task.options.{key}: not an option of task.family={cls.name}; options: {choices}.")
        for role, required in cls.roles.items():
            if required and not spec.columns.get(role):
                errors.append(f"task.{role}_column: task.family={cls.name} needs a {role} column; set it.")
        for metric in spec.metrics:
            if metric not in cls.metrics:
                errors.append(f"task.metrics: {metric!r} is not computed by task.family={cls.name}; use any of "
                              f"{', '.join(cls.metrics)}.")
        return errors

    @classmethod
    def model_errors(cls, model_config: Any) -> list[str]:
        """Problems of a model (its transformers config) for this family, e.g. an encoder for causal_lm."""
        return []

    @classmethod
    def training_errors(cls, args: Any) -> list[str]:
        """Training arguments this family cannot use (images have no length to group by or embed noise into)."""
        errors = []
        if not cls.has_length:
            if getattr(args, "train_sampling_strategy", "random") == "group_by_length":
                errors.append(f"trainer.train_sampling_strategy=group_by_length: task.family={cls.name} inputs have "
                              "no length; use random or sequential.")
            if getattr(args, "neftune_noise_alpha", None):
                errors.append(f"trainer.neftune_noise_alpha: NEFTune adds noise to token embeddings; "
                              f"task.family={cls.name} has none. Leave it unset.")
        if getattr(args, "predict_with_generate", False) and not cls.generates:
            errors.append(f"trainer.predict_with_generate=true: task.family={cls.name} does not generate; set it "
                          "to false (or use a generative family: seq2seq, causal_lm).")
        return errors

    def metric_names(self) -> list[str]:
        return list(self.spec.metrics)

    def column(self, role: str) -> str | None:
        return self.spec.columns.get(role)

    def input_columns(self) -> list[str]:
        """Raw columns a caller gives the served model (every role but the targets)."""
        return [c for role, c in self.spec.columns.items() if c and role in self.roles and role != "label"]

    # --- data ----------------------------------------------------------------------------------
    def check_raw(self, raw: Any, scored_splits: tuple[str, ...]) -> list[str]:
        """Problems of the raw DatasetDict (configured columns present, labels valid), naming the key or row."""
        errors = []
        for split, dataset in raw.items():
            for role in self.roles:
                column = self.column(role)
                if column is not None and column not in dataset.column_names:
                    errors.append(
                        f"task.{role}_column={column!r}: the {split} split has no such column "
                        f"(columns: {', '.join(dataset.column_names)}). Set task.{role}_column to one of them."
                    )
        return sorted(set(errors))

    def preprocess(self, tokenizer: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
        """A batched `datasets.map(..., with_indices=True)` function: raw rows -> features with `example_id`."""
        raise NotImplementedError

    def kept_raw_columns(self) -> list[str]:
        """Raw columns kept next to the features (shown again in predictions)."""
        return self.input_columns()

    def lengths(self, features: Any) -> list[int] | None:
        """Token length of each feature (length grouping, sorted inference); None when inputs have no length."""
        if not self.has_length:
            return None
        return [len(ids) for ids in features["input_ids"]]

    def tokenizer_texts(self, raw_split: Any) -> list[str]:
        """Texts to train a tokenizer on (model.tokenizer=wordpiece): every text input column, in order."""
        return [str(text) for column in self.input_columns() for text in raw_split[column]]

    # --- model ---------------------------------------------------------------------------------
    def build_model(self, model_spec: ModelSpec) -> Any:
        raise NotImplementedError

    def collator(self, tokenizer: Any = None, model: Any = None) -> Callable[[list[dict]], dict]:
        raise NotImplementedError

    def dataset_columns(self) -> tuple[str, ...]:
        """Columns the trainer keeps from a features split (the rest would break the collator)."""
        return (*self.model_input_names, *self.target_names)

    # --- training ------------------------------------------------------------------------------
    def split_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(model inputs, targets) of a collated batch."""
        inputs = {k: v for k, v in batch.items() if k not in self.target_names}
        targets = {k: batch[k] for k in self.target_names if k in batch}
        return inputs, targets

    def loss(self, outputs: Any, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of each example, summed over its items [B]."""
        if self.loss_hook is not None:
            return self.loss_hook(outputs.logits, targets["labels"])
        return self.loss_per_example(outputs.logits, targets["labels"], self.label_smoothing)

    @staticmethod
    def loss_per_example(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def count_items(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss items of each example [B]: 1 for one label per example."""
        import torch

        labels = targets["labels"]
        return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)

    # --- evaluation ----------------------------------------------------------------------------
    def eval_step(self, model: Any, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> EvalStep:
        """One evaluation batch: a forward pass (families that generate override this)."""
        outputs = model(**inputs)
        if not targets:
            return EvalStep(None, None, self.eval_outputs(outputs))
        return EvalStep(self.loss(outputs, targets), self.count_items(targets), self.eval_outputs(outputs))

    def eval_outputs(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {"logits": outputs.logits}

    def postprocess(self, predictions: dict[str, np.ndarray], dataset: Any = None) -> dict[str, np.ndarray]:
        """Gathered eval outputs (one row per feature) -> one record per example, as columns."""
        raise NotImplementedError

    def compute_metrics(self, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                        dataset: Any = None) -> dict[str, float]:
        raise NotImplementedError

    def prediction_rows(self, predictions: dict[str, np.ndarray], dataset: Any, scored: bool) -> Iterator[dict]:
        """One JSON-able row per example of `dataset` (features in their original order) for predictions.jsonl."""
        raise NotImplementedError

    # --- serving -------------------------------------------------------------------------------
    def serving_meta(self) -> dict[str, Any]:
        """What the registered model needs besides its weights (stored as serving.json next to them)."""
        return {"family": self.name, "task": dataclasses.asdict(self.spec), "input_columns": self.input_columns()}

    def serving_schema(self) -> dict[str, list]:
        """The MLflow signature as plain data: {"inputs": [[type, name|None], ...], "outputs": [...],
        "params": [[name, type, default], ...]} (register turns it into mlflow.models.ModelSignature)."""
        raise NotImplementedError

    def input_example(self, raw_split: Any) -> Any:
        """Two raw inputs from a split, in the form the signature takes."""
        raise NotImplementedError

    def load_for_serving(self, folder: str) -> tuple[Any, Any]:
        """(model in eval mode, tokenizer or processor) from a registered model's weights folder."""
        raise NotImplementedError

    def serve(self, model: Any, processor: Any, frame: Any, params: dict[str, Any] | None = None) -> Any:
        """Predictions (a DataFrame, one row per input row) for a DataFrame with `input_columns()`."""
        raise NotImplementedError

    def output_columns(self) -> list[str]:
        return [name for _, name in self.serving_schema()["outputs"]]
