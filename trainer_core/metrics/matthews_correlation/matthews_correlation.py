"""Matthews correlation coefficient. Kept in the repo so `evaluate.load(<this folder>)` works offline."""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = "Matthews correlation coefficient."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: predicted values. references: ground-truth values."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {'matthews_correlation': float(matthews_corrcoef(references, predictions, sample_weight=sample_weight))}
