"""Spearman rank correlation coefficient. Kept in the repo so `evaluate.load(<this folder>)` works offline."""

import datasets
import evaluate
from scipy.stats import spearmanr as _spearmanr

_DESCRIPTION = "Spearman rank correlation coefficient."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: predicted values. references: ground-truth values."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        return {'spearmanr': float(_spearmanr(predictions, references)[0])}
