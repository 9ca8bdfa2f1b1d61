"""Fraction of predictions equal to the reference. Kept in the repo so `evaluate.load(<this folder>)` works offline."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Fraction of predictions equal to the reference."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: predicted values. references: ground-truth values."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {'accuracy': float(accuracy_score(references, predictions, sample_weight=sample_weight, normalize=normalize))}
