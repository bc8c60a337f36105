"""Next-token choice: greedy, temperature, top-k and top-p (nucleus), reproducible under a seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    return log_softmax_and_weights(logits)[0]


def log_softmax_and_weights(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities over the last axis, and the unnormalised probabilities exp(logit - max) met
    on the way, which are exactly what sampling at temperature 1 draws from (see sample_batch): the
    exponential of a batch x vocabulary array is paid once, not twice."""
    logprobs = logits - logits.max(axis=-1, keepdims=True)  # shifted: max 0 per row
    weights = np.exp(logprobs)
    logprobs -= np.log(weights.sum(axis=-1, keepdims=True))  # in place: no third big array
    return logprobs, weights


def sample_batch(
    logprobs: np.ndarray,
    params: Sequence[SamplingParams],
    uniforms: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """One token id per row of logprobs [batch, vocab]; returns int64 [batch].

    Row i uses params[i] and the uniform draw uniforms[i] in [0, 1) from that session's own random
    stream, and its result depends on nothing else: a session gets the same tokens alone or in any
    batch. Rows that need no sort (greedy, plain temperature) are done together, vectorised; top-k /
    top-p rows each need their own cut and are done one by one. `weights` [batch, vocab], if given,
    are the rows' unnormalised probabilities (log_softmax_and_weights), used as they are for rows at
    temperature 1.
    """
    tokens = np.empty(len(params), dtype=np.int64)
    greedy: list[int] = []
    given: list[int] = []  # plain temperature 1 with weights given: drawn from those
    plain: list[int] = []
    cut: list[int] = []
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            greedy.append(i)
        elif p.top_k or p.top_p < 1.0:
            cut.append(i)
        else:
            (given if weights is not None and p.temperature == 1.0 else plain).append(i)
    if greedy:
        tokens[greedy] = np.argmax(logprobs[greedy], axis=-1)
    # Plain rows: inverse CDF over the whole vocabulary, no sort, O(vocab) per row.
    if given:
        assert weights is not None
        tokens[given] = inverse_cdf(weights if len(given) == len(params) else weights[given], uniforms[given])
    if plain:
        temperature = np.array([params[i].temperature for i in plain], dtype=np.float32)[:, None]  # [rows, 1]
        scaled = logprobs[plain] / temperature  # [rows, vocab]
        scaled -= scaled.max(axis=-1, keepdims=True)
        tokens[plain] = inverse_cdf(np.exp(scaled), uniforms[plain])  # unnormalised weights
    for i in cut:
        tokens[i] = _sample_cut(logprobs[i], params[i], float(uniforms[i]))
    return tokens


CDF_BLOCK = 128  # inverse_cdf's block size: a big cumulative sum becomes two small ones


def inverse_cdf(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row of weights [rows, vocab] (unnormalised, >= 0), the index i whose cumulative weight
    interval holds uniforms[row] * total (searchsorted side="right" on the cumulative sum); int64 [rows].

    Done in two levels, since a cumulative sum along a long axis is slow in numpy: block sums, the
    cumulative sum of those to find the block, then the cumulative sum of that one block. Each row's
    arithmetic is the same whatever the other rows are.
    """
    rows, vocab = weights.shape
    if vocab <= CDF_BLOCK:  # one block: its cumulative sum directly
        cdf = np.cumsum(weights, axis=-1, dtype=np.float64)  # [rows, vocab]
        found = (cdf <= (uniforms * cdf[:, -1])[:, None]).sum(axis=-1)  # [rows]
        return np.minimum(found, vocab - 1)
    full = vocab // CDF_BLOCK  # whole blocks; the rest of the row is one shorter block
    sums = [weights[:, : full * CDF_BLOCK].reshape(rows, full, CDF_BLOCK).sum(axis=-1)]  # [rows, full]
    if vocab % CDF_BLOCK:
        sums.append(weights[:, full * CDF_BLOCK :].sum(axis=-1, keepdims=True))  # [rows, 1]
    block_cdf = np.cumsum(np.concatenate(sums, axis=1), axis=-1, dtype=np.float64)  # [rows, blocks]
    target = uniforms * block_cdf[:, -1]  # [rows]
    block = np.minimum((block_cdf <= target[:, None]).sum(axis=-1), block_cdf.shape[1] - 1)  # [rows]
    row = np.arange(rows)
    before = np.where(block > 0, block_cdf[row, np.maximum(block - 1, 0)], 0.0)  # [rows]
    columns = block[:, None] * CDF_BLOCK + np.arange(CDF_BLOCK)  # [rows, block]
    inside = columns < vocab  # the last block may be short
    picked = np.where(inside, weights[row[:, None], np.minimum(columns, vocab - 1)], 0)  # [rows, block]
    inner_cdf = before[:, None] + np.cumsum(picked, axis=-1, dtype=np.float64)  # [rows, block]
    inner = np.minimum((inner_cdf <= target[:, None]).sum(axis=-1), CDF_BLOCK - 1)  # [rows]
    return np.minimum(block * CDF_BLOCK + inner, vocab - 1)


def _sample_cut(logprobs: np.ndarray, p: SamplingParams, u: float) -> int:
    """Top-k and/or top-p sampling of one row logprobs [vocab] with the uniform draw u."""
    scaled = logprobs.astype(np.float64) / p.temperature  # [vocab]
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
    index = int(np.searchsorted(cdf, u, side="right"))
    return int(candidates[min(index, len(cdf) - 1)])


class Sampler:
    """Chooses tokens for one generation; owns its random stream (one uniform draw per token)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def draw(self) -> float:
        """The next uniform draw of this generation's stream (drawn for every token, greedy too)."""
        return float(self._rng.random())

    def draws(self, count: int) -> np.ndarray:
        """The next `count` uniform draws, float64 [count] (the same values as `count` calls of draw)."""
        return self._rng.random(count)

    def choose(self, logprobs: np.ndarray) -> int:
        """One token id from logprobs [vocab] (the batch path with a batch of one)."""
        return int(sample_batch(logprobs[None, :], [self.params], np.array([self.draw()]))[0])


def draw_batch(samplers: Sequence[Sampler]) -> np.ndarray:
    """The next uniform draw of each sampler's own stream, float64 [samplers]."""
    return np.array([s.draw() for s in samplers])


def top_candidates(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, logprob) pairs of logprobs [vocab], most likely first."""
    k = min(k, logprobs.shape[-1])
    if k == 1:  # argmax is a tenth of argpartition's cost over a 10k vocabulary
        best = int(np.argmax(logprobs))
        return [(best, float(logprobs[best]))]
    ids = np.argpartition(-logprobs, k - 1)[:k]
    ids = ids[np.argsort(-logprobs[ids], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in ids]
