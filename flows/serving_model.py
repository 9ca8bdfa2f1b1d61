"""The registered model's Python code (MLflow "models from code": stored as source, never pickled).

    import mlflow
    model = mlflow.pyfunc.load_model("models:/rt_reviews-minilm_l6@champion")
    model.predict(["A triumph.", "Two hours I will never get back."])
    # -> DataFrame with columns label, score

Input: a list of strings, a list of dicts or a DataFrame with the task's text column(s).
The weights are safetensors, loaded with transformers from the model's artifacts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class TextClassifier(PythonModel):
    batch_size = 64

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = context.artifacts["model_dir"]
        with open(os.path.join(folder, "serving.json")) as handle:
            self.meta = json.load(handle)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def _frame(self, model_input: Any):
        import pandas as pd

        columns = self.meta["text_columns"]
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
            frame = frame.set_axis(columns, axis=1)  # one text column: matched by position, as MLflow does
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input has no column {', '.join(map(repr, missing))}: this model reads {', '.join(columns)} "
                f"(got columns {', '.join(map(str, frame.columns))})"
            )
        return frame

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would try to read a schema from them
        import pandas as pd
        import torch

        frame = self._frame(model_input)
        texts = [frame[c].astype(str).tolist() for c in self.meta["text_columns"]]
        names, labels, scores = self.meta["label_names"], [], []
        with torch.inference_mode():
            for start in range(0, len(frame), self.batch_size):
                chunk = [column[start : start + self.batch_size] for column in texts]
                encoded = self.tokenizer(
                    *chunk, truncation=True, max_length=self.meta["max_seq_length"], padding=True, return_tensors="pt"
                )
                logits = self.model(**encoded).logits.float()
                if logits.shape[-1] == 1:  # regression
                    labels += logits[:, 0].tolist()
                    scores += logits[:, 0].tolist()
                    continue
                probs = logits.softmax(-1)
                best = probs.argmax(-1)
                labels += [names[i] if names else str(i) for i in best.tolist()]
                scores += probs.gather(1, best[:, None])[:, 0].tolist()
        return pd.DataFrame({"label": labels, "score": scores})


mlflow.models.set_model(TextClassifier())
