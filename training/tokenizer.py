"""Character-, word- and subword (BPE) tokenizers built with HF `tokenizers`.

Language models reserve `<unk>` (id 0) and `<eos>` (id 1). The char tokenizer isolates every single
character (spaces, newlines and tabs included) and decodes by concatenation, so `decode(encode(s).ids) == s`
for in-vocabulary text; the word tokenizer splits on whitespace and punctuation and decodes joined by
single spaces. Vocabularies are built deterministically (count, then token order) in Python.

Classifiers reserve `<pad>` (id 0) and `<unk>` (id 1) instead (`CLASSIFIER_SPECIAL_TOKENS`), and may
lowercase: that lives in the tokenizer's normalizer, so whoever has only `tokenizer.json` (the server)
encodes exactly as training did with `tok.encode(text, add_special_tokens=False).ids`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The special tokens, in id order: role -> token text. Declared here and nowhere else.
SPECIAL_TOKENS: dict[str, str] = {"unk": "<unk>", "eos": "<eos>"}  # language models
CLASSIFIER_SPECIAL_TOKENS: dict[str, str] = {"pad": "<pad>", "unk": "<unk>"}  # classifiers
TOKENIZER_KINDS: tuple[str, ...] = ("char", "word")
CLASSIFIER_TOKENIZER_KINDS: tuple[str, ...] = ("word", "bpe")


def _vocab(
    counts: Counter[str], min_count: int, max_size: int | None, specials: dict[str, str] = SPECIAL_TOKENS
) -> dict[str, int]:
    """Specials first, then tokens seen >= min_count, most frequent first (ties by token)."""
    vocab = {tok: i for i, tok in enumerate(specials.values())}
    ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    for tok in ranked:
        if max_size is not None and len(vocab) >= max_size:
            break
        vocab.setdefault(tok, len(vocab))
    return vocab


def _finish(model_vocab: dict[str, int], specials: dict[str, str] = SPECIAL_TOKENS) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(model_vocab, unk_token=specials["unk"]))
    tok.add_special_tokens(list(specials.values()))  # already in the vocab: ids stay 0, 1, ...
    return tok


def build_char_tokenizer(text: str | Iterable[str], min_count: int = 1) -> Tokenizer:
    """A tokenizer with one token per character seen at least `min_count` times."""
    counts: Counter[str] = Counter()
    for chunk in [text] if isinstance(text, str) else text:
        counts.update(chunk)
    tok = _finish(_vocab(counts, min_count, None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


_WORD_SPLIT = pre_tokenizers.Whitespace()


def build_word_tokenizer(
    text: str | Iterable[str], min_freq: int = 1, max_size: int | None = 30_000
) -> Tokenizer:
    """A word-level tokenizer (whitespace + punctuation split); rarer words map to `<unk>`."""
    counts: Counter[str] = Counter()
    for chunk in [text] if isinstance(text, str) else text:
        counts.update(w for w, _ in _WORD_SPLIT.pre_tokenize_str(chunk))
    tok = _finish(_vocab(counts, min_freq, max_size))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok  # no decoder: tokens are joined by single spaces


def build_tokenizer(
    kind: str, text: str | Iterable[str], *, min_count: int = 1, max_size: int | None = None
) -> Tokenizer:
    """Dispatch on `kind`: "char" (min_count per char) or "word" (min_count per word, max_size)."""
    if kind == "char":
        return build_char_tokenizer(text, min_count=min_count)
    if kind == "word":
        return build_word_tokenizer(text, min_freq=min_count, max_size=max_size)
    raise ValueError(f"tokenizer kind {kind!r} is not one of {TOKENIZER_KINDS}")


def build_classifier_tokenizer(
    kind: str,
    texts: Iterable[str],
    *,
    lowercase: bool = True,
    min_freq: int = 1,
    vocab_size: int | None = 30_000,
) -> Tokenizer:
    """A classifier tokenizer over `texts` (the training split only), with `<pad>` = 0 and `<unk>` = 1.

    "word": whitespace + punctuation split, words seen >= `min_freq` times, at most `vocab_size` entries.
    "bpe": byte-pair merges learnt by the `tokenizers` BPE trainer up to `vocab_size` entries (pieces
    seen >= `min_freq` times); unseen characters map to `<unk>`. `lowercase` installs a Lowercase
    normalizer, so it is part of tokenizer.json and applies wherever the tokenizer is used.
    """
    normalizer = normalizers.Lowercase() if lowercase else None
    specials = CLASSIFIER_SPECIAL_TOKENS
    if kind == "word":
        counts: Counter[str] = Counter()
        for text in texts:
            norm = normalizer.normalize_str(text) if normalizer is not None else text
            counts.update(w for w, _ in _WORD_SPLIT.pre_tokenize_str(norm))
        tok = _finish(_vocab(counts, min_freq, vocab_size, specials), specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=specials["unk"]))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size or 30_000,
            min_frequency=min_freq,
            special_tokens=list(specials.values()),  # ids 0, 1 in this order
            show_progress=False,
        )
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.train_from_iterator(texts, trainer)
    else:
        raise ValueError(f"classifier tokenizer kind {kind!r} is not one of {CLASSIFIER_TOKENIZER_KINDS}")
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def special_token_ids(tok: Tokenizer, specials: dict[str, str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Role -> id of the special tokens, e.g. {"unk": 0, "eos": 1}; raises if one is missing."""
    ids: dict[str, int] = {}
    for role, text in specials.items():
        idx = tok.token_to_id(text)
        if idx is None:
            raise ValueError(f"tokenizer has no {text!r} token")
        ids[role] = idx
    return ids
