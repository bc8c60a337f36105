"""Client input to token ids: text is tokenised (big texts off the event loop) and ids are checked
against the model's vocabulary, with the size limits checked before any work is done."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from rnnserve.server.errors import InvalidArgument
from rnnserve.server.quoting import quote
from rnnserve.server.repository import LoadedModel
from rnnserve.server.text import TextCodec

# Texts up to this many characters in all are tokenised on the event loop (microseconds); longer ones in
# a tokenizer thread, so one big message never holds up other clients.
INLINE_TOKENIZE_CHARS = 4096


class InputLimits(Protocol):
    """The engine limits input is checked against (EngineLimits)."""

    @property
    def max_tokens_per_input(self) -> int: ...

    @property
    def max_input_chars(self) -> int: ...


class InputReader:
    """Token ids for what a client sent (see the module's docstring)."""

    def __init__(self, limits: InputLimits) -> None:
        self._limits = limits
        # Big texts are tokenised here, off the loop and off the ORT worker (which would delay every run).
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    def stop(self) -> None:
        self._tokenizer_pool.shutdown(wait=True)

    async def resolve_input(
        self, model: LoadedModel, data: str | Sequence[int], what: str = "input"
    ) -> list[int]:
        """Token ids for text or ids, checked against the model's vocabulary and the size limits."""
        return (await self.resolve_inputs(model, [data], [what]))[0]

    async def resolve_inputs(
        self, model: LoadedModel, inputs: Sequence[str | Sequence[int]], names: Sequence[str]
    ) -> list[list[int]]:
        """Token ids for each input (named `names[i]` in errors). Sizes are checked before any text is
        tokenised; big texts are tokenised in a tokenizer thread (see INLINE_TOKENIZE_CHARS)."""
        texts = {i: data for i, data in enumerate(inputs) if isinstance(data, str)}
        for i, text in texts.items():
            self._check_text_size(text, names[i])
        ids: list[list[int] | None] = [
            None if isinstance(data, str) else self._checked_ids(model, data, names[i])
            for i, data in enumerate(inputs)
        ]
        encoded = await self._encode(model.codec, list(texts.values()))
        for (i, text), text_ids in zip(texts.items(), encoded, strict=True):
            if not text_ids:
                raise InvalidArgument(f"{names[i]} text {quote(text, 40)} encodes to no tokens")
            self._check_token_count(len(text_ids), names[i])
            ids[i] = text_ids
        return [i for i in ids if i is not None]

    def _check_text_size(self, text: str, what: str) -> None:
        if not text:
            raise InvalidArgument(f"{what} is empty")
        most = self._limits.max_input_chars
        if len(text) > most:
            raise InvalidArgument(
                f"{what} has {len(text):,} characters, more than the limit of {most:,} "
                f"(and at most {self._limits.max_tokens_per_input:,} tokens); split it into several "
                "messages (the session keeps state between them)"
            )

    def _check_token_count(self, count: int, what: str) -> None:
        if count > self._limits.max_tokens_per_input:
            raise InvalidArgument(
                f"{what} has {count:,} tokens, more than the limit of {self._limits.max_tokens_per_input:,}; "
                "split it into several messages (the session keeps state between them)"
            )

    def _checked_ids(self, model: LoadedModel, data: Sequence[int], what: str) -> list[int]:
        if not data:
            raise InvalidArgument(f"{what} has no tokens: send text or at least one token id")
        self._check_token_count(len(data), what)
        ids = np.asarray(data, dtype=np.int64)  # [tokens]
        vocab = model.manifest.vocab_size
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))  # [bad tokens]
        if bad.size:
            index = int(bad[0])
            raise InvalidArgument(
                f"token id {int(ids[index])} at index {index} is out of range for model {model.key} "
                f"(vocabulary size {vocab}: ids 0..{vocab - 1}); {bad.size:,} ids out of range in all"
            )
        return [int(i) for i in ids.tolist()]

    async def _encode(self, codec: TextCodec, texts: list[str]) -> list[list[int]]:
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            return [codec.encode(t) for t in texts]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, self._tokenize, codec, texts)

    @staticmethod
    def _tokenize(codec: TextCodec, texts: list[str]) -> list[list[int]]:
        """In a tokenizer thread: encode_batch releases the GIL while it works (encode does not, so it
        would stall the event loop even from another thread)."""
        encodings = codec.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(e.ids) for e in encodings]
