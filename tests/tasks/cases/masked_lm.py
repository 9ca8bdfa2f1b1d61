"""masked_lm on Salesforce/wikitext's schema (one `text` column; blank rows have no block, see test_masked_lm), whole-word masking on a tiny BERT."""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import TaskSpec

CASE = FamilyCase(
    spec=TaskSpec(family="masked_lm", columns={"text": "text"}, num_labels=1, metrics=["perplexity", "accuracy"],
                  max_seq_length=16, options={"block_size": 10, "mlm_probability": 0.3, "whole_word_masking": True}),
    # every document has at least block_size tokens: each starts a block (its example_id is found)
    raw={"text": [" = Valkyria Chronicles III = the third game of the series \n",
                  " The game began development in 2010 , carrying over a large portion of the work . \n",
                  " It met with positive sales in Japan , and was praised by both critics and players . \n"]},
)
