"""text_classification on glue/mrpc's schema: sentence1, sentence2, label (ClassLabel ids)."""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import TaskSpec

CASE = FamilyCase(
    spec=TaskSpec(family="text_classification", columns={"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                  num_labels=2, label_names=["not_equivalent", "equivalent"], metrics=["accuracy", "f1"]),
    raw={"sentence1": ["the cat sat on the mat", "a dog ran", "birds sing at dawn"],
         "sentence2": ["a cat was sitting on a mat", "the sky is green", "at dawn the birds sing"],
         "label": [1, 0, 1], "idx": [0, 1, 2]},
)
