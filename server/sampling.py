"""Next-token choice: greedy, temperature, top-k and top-p (nucleus), reproducible under a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import InvalidArgument

MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters with the meaning vLLM/TGI users know.

    temperature 0 = greedy (argmax); top_k 0 = no cut; top_p 1 = no cut; seed None = nondeterministic.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidArgument naming the bad parameter and its allowed range."""
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(
                f"temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy), got {self.temperature}"
            )
        if self.top_k < 0 or self.top_k > vocab_size:
            raise InvalidArgument(f"top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, computed stably in float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Sampler:
    """Chooses tokens from log-probabilities for one generation; owns its random stream."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def choose(self, logprobs: np.ndarray) -> int:
        """One token id from logprobs [vocab]."""
        p = self.params
        if p.temperature == 0.0:
            return int(np.argmax(logprobs))
        scaled = logprobs.astype(np.float64) / p.temperature  # [vocab]
        if not p.top_k and p.top_p >= 1.0:
            # Plain temperature sampling needs no sort: inverse CDF over the whole vocabulary, O(vocab).
            cdf = np.cumsum(np.exp(scaled - scaled.max()))
            return int(min(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"), len(cdf) - 1))
        if p.top_k:
            # Only the k best need ordering: partition first (O(vocab)), then sort k of them.
            best = np.argpartition(-scaled, p.top_k - 1)[: p.top_k]
            candidates = best[np.argsort(-scaled[best], kind="stable")]
        else:
            candidates = np.argsort(-scaled, kind="stable")  # ids, most likely first
        probs = np.exp(scaled[candidates] - scaled[candidates[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        cdf = np.cumsum(probs)
        index = int(np.searchsorted(cdf, self._rng.random(), side="right"))
        return int(candidates[min(index, len(cdf) - 1)])


def top_candidates(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, logprob) pairs of logprobs [vocab], most likely first."""
    k = min(k, logprobs.shape[-1])
    ids = np.argpartition(-logprobs, k - 1)[:k]
    ids = ids[np.argsort(-logprobs[ids], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in ids]
