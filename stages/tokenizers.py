"""Tokenizers for the prepare_data stage: the pretrained one of the weights, or one trained on the task's data.

    tokenizer = build_tokenizer(model_config, family, raw_train_split)

model.tokenizer picks: `pretrained` (from the weights' folder), `wordpiece` (a BERT-style WordPiece vocabulary
built from the family's texts, for random-init models in tests and trials) or `bpe` (a GPT-2-style byte-level BPE
built from the family's texts, for random-init decoders such as model=tiny_gpt2).
"""

from __future__ import annotations

from stages.common import resolve_model_path
from stages.schema import ModelConfig


def train_wordpiece(texts: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer for random-init models, built from the given texts.

    The vocabulary is every character (alone and as a ##suffix) plus the most frequent words, ties broken
    alphabetically. tokenizers' WordPieceTrainer breaks ties differently from run to run, and a tokenizer
    that changes on every rebuild would change every cache key downstream.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(text)))
    )
    chars = sorted({char for word in words for char in word})
    vocab = specials + chars + [f"##{char}" for char in chars]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += frequent[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


BPE_SPECIALS = ("<|endoftext|>", "<pad>", "<mask>")
"""Ids 0, 1, 2 of every `bpe` tokenizer: conf/model/tiny_gpt2.yaml sets bos/eos_token_id 0 and pad_token_id 1."""


def train_bpe(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer for random-init decoders, built from the given texts.

    Ids: <|endoftext|> 0 (bos, eos and unk, as GPT-2), <pad> 1, <mask> 2, then the 256 byte symbols, then the
    merges. Merges are learned from word counts in a fixed order (ties broken by the pair itself), so the same
    texts give the same tokenizer in every process; tokenizers' BpeTrainer is not used for the same reason as
    WordPieceTrainer above.
    """
    from collections import Counter
    from itertools import pairwise

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = Counter(piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(str(text)))
    vocab = {token: i for i, token in enumerate([*BPE_SPECIALS, *alphabet])}
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, symbols in splits.items():
            for pair in pairwise(symbols):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=BPE_SPECIALS[0]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoders.ByteLevel()
    tok.add_special_tokens(list(BPE_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BPE_SPECIALS[0],
        eos_token=BPE_SPECIALS[0],
        unk_token=BPE_SPECIALS[0],
        pad_token=BPE_SPECIALS[1],
        mask_token=BPE_SPECIALS[2],
        model_input_names=["input_ids", "attention_mask"],
    )


IMPORTS = "transformers.models.auto.tokenization_auto"
"""What build_tokenizer imports first (transformers and torch, ~2 s on 2 cores): the command line imports it while
the temporary API boots on the other core, where the prepare_data stage will run (flows/finetune.py)."""

KINDS = ("pretrained", "wordpiece", "bpe", "seq2seq", "image_processor")
"""model.tokenizer values: from the weights' folder, or built here for random-init models."""


def build_tokenizer(model: ModelConfig, family, train_split):
    """The tokenizer (or image processor) the features are made with, saved next to them."""
    if not family.has_length or model.tokenizer == "image_processor":  # images: an image processor
        from stages.processors import build_processor

        return build_processor(model, family)
    texts = family.tokenizer_texts(train_split) if model.tokenizer != "pretrained" else None
    if model.tokenizer == "wordpiece":
        return train_wordpiece(texts, model.tokenizer_vocab_size)
    if model.tokenizer == "bpe":
        return train_bpe(texts, model.tokenizer_vocab_size)
    if model.tokenizer == "seq2seq":
        from stages.tokenizers_seq2seq import train_seq2seq_tokenizer

        return train_seq2seq_tokenizer(texts, model.tokenizer_vocab_size)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(model), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
