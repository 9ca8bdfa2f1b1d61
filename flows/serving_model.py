"""The registered model's Python code (MLflow "models from code": stored as source, never pickled).

    import mlflow
    model = mlflow.pyfunc.load_model("models:/rt_reviews-minilm_l6@champion")
    model.predict(["A triumph.", "Two hours I will never get back."])
    # -> DataFrame with the task family's outputs (text classification: label, score)

Not a stage: the entry point MLflow loads. The task family (trainer_core/tasks/, shipped with the model as
code) reads the inputs and predicts; serving.json next to the weights says which family and task. Input: a
list of strings, a list of dicts, a dict or a DataFrame with the family's input columns.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TaskModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from trainer_core import adapters
        from trainer_core.spec import TaskSpec
        from trainer_core.tasks import get_task

        folder = context.artifacts["model_dir"]
        with open(os.path.join(folder, "serving.json")) as handle:
            self.meta = json.load(handle)
        self.family = get_task(self.meta["family"])(TaskSpec(**self.meta["task"]))
        if adapters.is_adapter_package(folder):  # registry.merge_adapter=false: the pinned base + the adapter
            with adapters.base_folder(folder) as base:
                self.model, self.processor = self.family.load_for_serving(str(base))
            self.model = adapters.attach(self.model, folder)
        else:
            self.model, self.processor = self.family.load_for_serving(folder)

    def _frame(self, model_input: Any):
        columns = self.meta["input_columns"]
        if isinstance(model_input, pd.DataFrame):
            frame = model_input
        elif isinstance(model_input, str):
            frame = pd.DataFrame({columns[0]: [model_input]})
        elif isinstance(model_input, dict):
            frame = pd.DataFrame(model_input if isinstance(next(iter(model_input.values()), None), list) else [model_input])
        elif isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
            frame = pd.DataFrame(model_input)
        else:
            frame = pd.DataFrame({columns[0]: list(model_input)})
        if len(columns) == 1 and len(frame.columns) == 1:
            frame = frame.set_axis(columns, axis=1)  # one input column: matched by position, as MLflow does
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input has no column {', '.join(map(repr, missing))}: this model reads {', '.join(columns)} "
                f"(got columns {', '.join(map(str, frame.columns))})"
            )
        return frame

    # a DataFrame hint: MLflow infers no schema from it (the registered signature is the family's) and does not warn
    # that hints are missing; strings, dicts and lists still come through _frame
    def predict(self, context, model_input: pd.DataFrame, params=None):
        return self.family.serve(self.model, self.processor, self._frame(model_input), params)


mlflow.models.set_model(TaskModel())
