"""token_classification on conll2003's schema: tokens (words), ner_tags (ids of O, B-PER, I-PER, B-LOC, I-LOC)."""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import TaskSpec

CASE = FamilyCase(
    spec=TaskSpec(family="token_classification", columns={"tokens": "tokens", "label": "ner_tags"},
                  num_labels=5, label_names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], metrics=["accuracy", "f1"]),
    raw={"tokens": [["Ada", "Lovelace", "visited", "Londonderry"], ["Paris", "is", "big"], ["Bob", "met", "Ada"]],
         "ner_tags": [[1, 2, 0, 3], [3, 0, 0], [1, 0, 1]], "id": ["0", "1", "2"]},
)
