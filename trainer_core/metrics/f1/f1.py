"""F1 score (binary for two labels, else `average` as given). Kept in the repo so `evaluate.load(<this folder>)` works offline."""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 score (binary for two labels, else `average` as given)."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: predicted values. references: ground-truth values."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average='binary', sample_weight=None):
        return {'f1': float(f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight)) if average is not None else f1_score(references, predictions, labels=labels, pos_label=pos_label, average=None, sample_weight=sample_weight).tolist()}
