"""A tokenizer for random-init encoder-decoder models (model.tokenizer=seq2seq, e.g. model=tiny_t5).

    from stages.tokenizers_seq2seq import train_seq2seq_tokenizer
    tokenizer = train_seq2seq_tokenizer(family.tokenizer_texts(raw["train"]), vocab_size=2000)

T5's special-token layout, so that a T5Config left at its defaults fits it: <pad> = 0 (also the decoder start),
</s> = 1 (appended to every sequence, sources and targets alike), <unk> = 2. No [CLS]: T5 has none.
"""

from __future__ import annotations

SPECIALS = ("<pad>", "</s>", "<unk>")
"""In id order: the ids are T5Config's pad_token_id=0, eos_token_id=1 (and decoder_start_token_id=pad)."""


def train_seq2seq_tokenizer(texts: list[str], vocab_size: int):
    """A deterministic WordPiece vocabulary (every character, alone and as a ##suffix, plus the most frequent
    words, ties broken alphabetically) with T5's specials; case and accents kept (BLEU and chrF see them)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(text)))
    )
    chars = sorted({char for word in words for char in word})
    vocab = list(SPECIALS) + chars + [f"##{char}" for char in chars]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += frequent[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", SPECIALS.index("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
