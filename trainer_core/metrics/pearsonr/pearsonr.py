"""Pearson correlation coefficient. Kept in the repo so `evaluate.load(<this folder>)` works offline."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Pearson correlation coefficient."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: predicted values. references: ground-truth values."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pearsonr(evaluate.Metric):
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
        return {'pearsonr': float(np.corrcoef(np.asarray(predictions, dtype=float), np.asarray(references, dtype=float))[0, 1])}
