"""question_answering on rajpurkar/squad_v2's schema: id, title, context, question, answers {text, answer_start}.

The first two examples fit in one window (the contract test collates features 0 and 1: two examples); the third
is longer than max_seq_length and is cut into several windows; the fourth has no answer (v2).
"""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import TaskSpec

_LONG = ("the river runs north through the old valley past farms and mills and bridges . " * 3
         + "the tower stands in paris near the river .")
_CONTEXTS = ["alice lives in london .", "the cat is black and small .", _LONG, "bob plays the piano ."]
_ANSWERS = [("london", _CONTEXTS[0].index("london")), ("black", _CONTEXTS[1].index("black")),
            ("paris", _LONG.index("paris")), None]

CASE = FamilyCase(
    spec=TaskSpec(family="question_answering",
                  columns={"id": "id", "question": "question", "context": "context", "answers": "answers"},
                  metrics=["exact_match", "f1"], max_seq_length=32,
                  options={"doc_stride": 8, "version_2_with_negative": True, "max_answer_length": 8}),
    raw={"id": ["q0", "q1", "q2", "q3"], "title": ["t"] * 4, "context": _CONTEXTS,
         "question": ["where does alice live ?", "what color is the cat ?", "where is the tower ?",
                      "where does bob live ?"],
         "answers": [{"text": [a[0]], "answer_start": [a[1]]} if a else {"text": [], "answer_start": []}
                     for a in _ANSWERS]},
)
