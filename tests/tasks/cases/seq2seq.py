"""seq2seq on cnn_dailymail 3.0.0's schema (article, highlights, id) with a tiny random T5 and a T5-layout
tokenizer (<pad> 0 = decoder start, </s> 1, <unk> 2) trained on the rows."""

from tests.tasks.factories import FamilyCase
from trainer_core.spec import ModelSpec, TaskSpec

TINY_T5 = {"model_type": "t5", "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16}


def seq2seq_tokenizer(family, raw):
    import datasets

    from stages.tokenizers_seq2seq import train_seq2seq_tokenizer

    return train_seq2seq_tokenizer(family.tokenizer_texts(datasets.Dataset.from_dict(raw)), vocab_size=300)


CASE = FamilyCase(
    spec=TaskSpec(family="seq2seq", columns={"source": "article", "target": "highlights"},
                  metrics=["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "gen_len"], max_seq_length=64,
                  options={"source_prefix": "summarize: ", "max_target_length": 16, "generation_max_length": 6}),
    raw={"article": ["The council approved the new park on Monday. Work starts in May.",
                     "A storm closed the coastal road overnight. Crews cleared it by noon.",
                     "The team won the final after extra time. Fans filled the square."],
         "highlights": ["Council approves new park.\nWork starts in May.", "Storm closes coastal road.",
                        "Team wins the final."],
         "id": ["a1", "b2", "c3"]},
    model=ModelSpec(config=dict(TINY_T5), dropout=0.0),
    processor=seq2seq_tokenizer,
)
