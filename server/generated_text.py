"""A generation's text as its reader sees it: stop strings found (and text that may start one held back),
and the tokens a Generate already made rebuilt for a retry under its request_id (`Replay`).

`rnnserve.server.generation.Generation` runs the same matcher on the tokens it samples, and a retry that
resumes goes on from its Replay's decoder and matcher; both names are re-exported there.
"""

from __future__ import annotations

from collections.abc import Sequence

from rnnserve.server.generate_request import GeneratedToken
from rnnserve.server.sessions import AppliedGeneration
from rnnserve.server.text import IncrementalDecoder, TextCodec


class StopMatcher:
    """Finds stop strings in generated text and holds back text that may be the start of one.

    Only text not sent yet is kept: a stop string can begin only there (text that could begin one is
    held back), so each push costs O(stops x longest stop), however long the generation (the stop
    strings' length is bounded by EngineLimits.max_stop_chars).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""  # text held back: a suffix shorter than the longest stop (between pushes)

    def push(self, delta: str) -> tuple[str, bool]:
        """Add delta; returns (text safe to send now, whether a stop string was found)."""
        if not self.stops:
            return delta, False  # nothing to find or hold back (the common case, once per token)
        text = self.pending + delta
        hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.pending = ""  # the stop string and what follows are never sent
            return text[:hit], True
        cut = len(text) - max(self._partial_len(text, s) for s in self.stops)
        self.pending = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    @staticmethod
    def _partial_len(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop` (0 if none)."""
        first = stop[0]
        # Candidates start where stop's first character occurs within the last len(stop) - 1 characters;
        # the earliest that matches is the longest.
        i = text.find(first, max(0, len(text) - len(stop) + 1))
        while i >= 0:
            if stop.startswith(text[i:]):
                return len(text) - i
            i = text.find(first, i + 1)
        return 0


class Replay:
    """The tokens a Generate already made (its AppliedGeneration), as its reader saw them, for a retry
    under its request_id; and the text state after them, from which the generation goes on."""

    def __init__(self, codec: TextCodec, applied: AppliedGeneration, stops: Sequence[str]) -> None:
        self.decoder = IncrementalDecoder(codec, list(applied.recent_before))
        self.stops = StopMatcher(stops)
        self.tokens: list[GeneratedToken] = []
        last = len(applied.token_ids) - 1
        last_sampled = last - 1 if applied.appended_eos else last
        for i, (token, logprob) in enumerate(zip(applied.token_ids, applied.logprobs, strict=True)):
            position, finish = applied.first_position + 1 + i, applied.finish_reason if i == last else None
            if i > last_sampled:  # the <eos> appended by end_turn: no text (see GenerateCalls._close_turn)
                self.tokens.append(GeneratedToken(token, "", logprob, position, finish))
                continue
            text, _ = self.stops.push(self.decoder.push(token))  # as Generation._sampled_next does
            if i == last_sampled and applied.finish_reason:
                text += self.stops.flush()
            self.tokens.append(GeneratedToken(token, text, logprob, position, finish))
