"""Text <-> token ids for one model, with the model's own `tokenizer.json` (HF tokenizers)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    """Encodes prompts, decodes tokens, and turns a growing list of generated ids into text deltas."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, int]) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self._special_ids = set(special_tokens.values())

    @classmethod
    def from_file(cls, path: Path, special_tokens: dict[str, int]) -> TextCodec:
        return cls(Tokenizer.from_file(str(path)), special_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens (e.g. <eos>) decode to nothing."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (special tokens keep their name, e.g. "<eos>")."""
        if token_id in self._special_ids:
            return self.tokenizer.id_to_token(token_id) or ""
        return self.decode([token_id])


class IncrementalDecoder:
    """Text deltas for ids appended one by one.

    Decoding each token alone is wrong for tokenizers whose decoder looks at neighbours (word-level
    inserts spaces between words; BPE merges bytes), so we decode a short window ending at the new
    token and emit what it adds to the window's text (the prefix/read offset technique of TGI/vLLM).
    """

    def __init__(self, codec: TextCodec, context: list[int] | None = None) -> None:
        self._codec = codec
        self._ids: list[int] = list(context or [])
        self._prefix_offset = 0  # the context is decoded too, so the first delta gets its leading space
        # A context that ends inside a character (a Generate cut mid-character) decodes to a trailing
        # U+FFFD that was never sent: its tokens count as unread, so the character is sent whole once
        # the tokens pushed complete it. (A character is at most 4 bytes: a few steps back at most.)
        read = len(self._ids)
        while read > 0 and codec.decode(self._ids[:read]).endswith("\ufffd"):
            read -= 1
        self._read_offset = read

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._codec.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._codec.decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""
