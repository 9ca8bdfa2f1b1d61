"""causal_lm on Salesforce/wikitext's schema (one `text` column; blank rows have no block, see test_causal_lm), packed blocks on a tiny GPT-2."""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import ModelSpec, TaskSpec

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def bpe_tokenizer(family, raw):
    """The byte-level BPE that model.tokenizer=bpe builds from the family's texts."""
    import datasets

    from stages.tokenizers import train_bpe

    return train_bpe(family.tokenizer_texts(datasets.Dataset.from_dict(raw)), vocab_size=300)


CASE = FamilyCase(
    spec=TaskSpec(family="causal_lm", columns={"text": "text"}, num_labels=1, metrics=["perplexity", "accuracy"],
                  max_seq_length=16, options={"block_size": 8, "packing": True}),
    # every document has at least block_size tokens: each starts a block (its example_id is found)
    raw={"text": [" = Valkyria Chronicles III = \n",
                  " The game began development in 2010 , carrying over a large portion of the work . \n",
                  " It met with positive sales in Japan , and was praised by both critics and players . \n"]},
    model=ModelSpec(config=dict(TINY_GPT2), dropout=0.0),
    processor=bpe_tokenizer,
)
