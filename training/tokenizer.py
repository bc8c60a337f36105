"""Character-, word- and subword (BPE) tokenizers built with HF `tokenizers`, saved as `tokenizer.json`.

Language models reserve `<unk>` (id 0) and `<eos>` (id 1); classifiers reserve `<pad>` (id 0) and `<unk>`
(id 1) (`CLASSIFIER_SPECIAL_TOKENS`). Both tables are declared here and nowhere else. The special tokens
are "added tokens" of the tokenizer, so their text in a corpus (WikiText's and PTB's own `<unk>`) encodes
to their id and never enters the vocabulary as ordinary words.

Language models (`build_tokenizer(kind, ...)`, built from the training split only):
- "char": every single character is a token (spaces, newlines and tabs included) and decodes by
  concatenation, so `decode(encode(s).ids) == s` for in-vocabulary text.
- "word": words seen >= `min_count` times, at most `max_size` entries, others `<unk>`. Plain text is
  split at whitespace and punctuation; an already tokenised corpus (`pretokenized=True`: WikiText, PTB)
  is split at whitespace only, as the published perplexities count it. Decodes joined by single spaces.
- "bpe": byte-level BPE (GPT-2 style) with merges learnt up to `max_size` entries; every string is
  encodable and the ByteLevel decoder in tokenizer.json restores it exactly, spaces and newlines included.

Vocabularies are built deterministically (count, then token order). Classifiers may lowercase: that lives
in the tokenizer's normalizer, so whoever has only `tokenizer.json` (the server) encodes exactly as
training did with `tok.encode(text, add_special_tokens=False).ids`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The special tokens, in id order: role -> token text. Declared here and nowhere else.
SPECIAL_TOKENS: dict[str, str] = {"unk": "<unk>", "eos": "<eos>"}  # language models
CLASSIFIER_SPECIAL_TOKENS: dict[str, str] = {"pad": "<pad>", "unk": "<unk>"}  # classifiers
TOKENIZER_KINDS: tuple[str, ...] = ("char", "word", "bpe")
CLASSIFIER_TOKENIZER_KINDS: tuple[str, ...] = ("word", "bpe")
DEFAULT_BPE_VOCAB = 8_000  # BPE target size when no `max_size` is given


def _texts(text: str | Iterable[str]) -> Iterable[str]:
    return [text] if isinstance(text, str) else text


def _without_specials(texts: Iterable[str], specials: dict[str, str]) -> Iterator[str]:
    """The pieces of each text between special-token strings: what the vocabulary is learnt from (the
    tokenizer matches special tokens before splitting, so `<unk>` in a corpus is the `<unk>` id, never
    the words `<`, `unk`, `>`)."""
    pattern = re.compile("|".join(re.escape(t) for t in specials.values()))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


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
    for chunk in _without_specials(_texts(text), SPECIAL_TOKENS):
        counts.update(chunk)
    tok = _finish(_vocab(counts, min_count, None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _word_splitter(pretokenized: bool) -> pre_tokenizers.PreTokenizer:
    """Whitespace only for an already tokenised corpus; whitespace and punctuation for plain text."""
    return pre_tokenizers.WhitespaceSplit() if pretokenized else pre_tokenizers.Whitespace()


def build_word_tokenizer(
    text: str | Iterable[str],
    min_freq: int = 1,
    max_size: int | None = 30_000,
    *,
    pretokenized: bool = False,
) -> Tokenizer:
    """A word-level tokenizer; words seen fewer than `min_freq` times (or beyond `max_size` entries,
    specials included) map to `<unk>`. `pretokenized`: split at whitespace only (WikiText, PTB)."""
    split = _word_splitter(pretokenized)
    counts: Counter[str] = Counter()
    for chunk in _without_specials(_texts(text), SPECIAL_TOKENS):
        counts.update(w for w, _ in split.pre_tokenize_str(chunk))
    tok = _finish(_vocab(counts, min_freq, max_size))
    tok.pre_tokenizer = _word_splitter(pretokenized)
    return tok  # no decoder: tokens are joined by single spaces


def _train_bpe(
    tok: Tokenizer,
    texts: Iterable[str],
    vocab_size: int,
    min_freq: int,
    specials: dict[str, str],
    initial_alphabet: list[str] | None = None,
) -> Tokenizer:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_freq,
        special_tokens=list(specials.values()),  # ids 0, 1 in this order
        show_progress=False,
        initial_alphabet=initial_alphabet or [],
    )
    tok.train_from_iterator(_without_specials(texts, specials), trainer)
    return tok


def build_bpe_tokenizer(
    text: str | Iterable[str], max_size: int | None = DEFAULT_BPE_VOCAB, min_freq: int = 2
) -> Tokenizer:
    """Byte-level BPE for language models: merges of pairs seen >= `min_freq` times, up to `max_size`
    entries (specials and the 256 byte symbols included). Any text encodes (no `<unk>` needed) and the
    ByteLevel decoder saved in tokenizer.json restores it byte for byte."""
    size = max_size or DEFAULT_BPE_VOCAB
    if size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"a byte-level BPE vocabulary needs at least {len(SPECIAL_TOKENS) + 256} entries")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes, so nothing is ever <unk>
    return _train_bpe(tok, _texts(text), size, min_freq, SPECIAL_TOKENS, initial_alphabet=alphabet)


def build_tokenizer(
    kind: str,
    text: str | Iterable[str],
    *,
    min_count: int = 1,
    max_size: int | None = None,
    pretokenized: bool = False,
) -> Tokenizer:
    """A language-model tokenizer of `kind` learnt from `text` (the training split only):
    "char" (characters seen >= min_count times), "word" (words seen >= min_count times, at most
    max_size entries; `pretokenized` splits at whitespace only) or "bpe" (byte-level, max_size entries,
    pairs seen >= min_count times)."""
    if kind == "char":
        return build_char_tokenizer(text, min_count=min_count)
    if kind == "word":
        return build_word_tokenizer(text, min_freq=min_count, max_size=max_size, pretokenized=pretokenized)
    if kind == "bpe":
        return build_bpe_tokenizer(text, max_size=max_size, min_freq=min_count)
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
    split = _word_splitter(pretokenized=False)
    if kind == "word":
        counts: Counter[str] = Counter()
        for text in _without_specials(texts, specials):
            norm = normalizer.normalize_str(text) if normalizer is not None else text
            counts.update(w for w, _ in split.pre_tokenize_str(norm))
        tok = _finish(_vocab(counts, min_freq, vocab_size, specials), specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=specials["unk"]))
        tok.pre_tokenizer = _word_splitter(pretokenized=False)
        if normalizer is not None:
            tok.normalizer = normalizer
        _train_bpe(tok, texts, vocab_size or 30_000, min_freq, specials)
    else:
        raise ValueError(f"classifier tokenizer kind {kind!r} is not one of {CLASSIFIER_TOKENIZER_KINDS}")
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = _word_splitter(pretokenized=False)
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
