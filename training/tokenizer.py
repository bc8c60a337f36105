"""Character- and word-level tokenizers built with HF `tokenizers` (WordLevel model).

Both reserve `<unk>` (id 0) and `<eos>` (id 1). The char tokenizer isolates every single character
(spaces, newlines and tabs included) and decodes by concatenation, so `decode(encode(s).ids) == s` for
in-vocabulary text; the word tokenizer splits on whitespace and punctuation and decodes joined by
single spaces. Vocabularies are built deterministically (count, then token order) in Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

# The special tokens, in id order: role -> token text. Declared here and nowhere else.
SPECIAL_TOKENS: dict[str, str] = {"unk": "<unk>", "eos": "<eos>"}
TOKENIZER_KINDS: tuple[str, ...] = ("char", "word")


def _vocab(counts: Counter[str], min_count: int, max_size: int | None) -> dict[str, int]:
    """Specials first, then tokens seen >= min_count, most frequent first (ties by token)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    for tok in ranked:
        if max_size is not None and len(vocab) >= max_size:
            break
        vocab.setdefault(tok, len(vocab))
    return vocab


def _finish(model_vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(model_vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))  # already in the vocab: ids stay 0 and 1
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


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Role -> id of the special tokens, e.g. {"unk": 0, "eos": 1}; raises if one is missing."""
    ids: dict[str, int] = {}
    for role, text in SPECIAL_TOKENS.items():
        idx = tok.token_to_id(text)
        if idx is None:
            raise ValueError(f"tokenizer has no {text!r} token")
        ids[role] = idx
    return ids
