"""multiple_choice on allenai/swag's `regular` schema: sent1 (context), sent2 (start of the ending),
ending0..ending3, label (index of the right ending), plus SWAG's bookkeeping columns."""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import TaskSpec

CASE = FamilyCase(
    spec=TaskSpec(family="multiple_choice",
                  columns={"context": "sent1", "question_header": "sent2", "label": "label",
                           "endings": ["ending0", "ending1", "ending2", "ending3"]},
                  num_labels=4, metrics=["accuracy"], max_seq_length=32),
    raw={"video-id": ["v0", "v1", "v2"], "fold-ind": ["0", "1", "2"],
         "startphrase": ["she opens the door . she", "he picks up the ball . he", "the dog barks . it"],
         "sent1": ["she opens the door .", "he picks up the ball .", "the dog barks ."],
         "sent2": ["she", "he", "it"],
         "ending0": ["walks outside .", "eats the sky .", "runs away ."],
         "ending1": ["sings to a fish .", "throws it to his friend .", "becomes a tree ."],
         "ending2": ["turns into rain .", "drinks the ball .", "reads a book ."],
         "ending3": ["paints the moon .", "flies to the sun .", "cooks dinner ."],
         "gold-source": ["gold", "gold", "gold"], "label": [0, 1, 0]},
)
