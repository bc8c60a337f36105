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
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_batch(logprobs: np.ndarray, params: Sequence[SamplingParams], uniforms: np.ndarray) -> np.ndarray:
    """One token id per row of logprobs [batch, vocab]; returns int64 [batch].

    Row i uses params[i] and the uniform draw uniforms[i] in [0, 1) from that session's own random
    stream, and its result depends on nothing else: a session gets the same tokens alone or in any
    batch. Rows that need no sort (greedy, plain temperature) are done together, vectorised; top-k /
    top-p rows each need their own cut and are done one by one.
    """
    tokens = np.empty(len(params), dtype=np.int64)
    greedy: list[int] = []
    plain: list[int] = []
    cut: list[int] = []
    for i, p in enumerate(params):
        (greedy if p.temperature == 0.0 else plain if not p.top_k and p.top_p >= 1.0 else cut).append(i)
    if greedy:
        tokens[greedy] = np.argmax(logprobs[greedy], axis=-1)
    if plain:
        # Inverse CDF over the whole vocabulary: no sort, O(vocab) per row.
        temperature = np.array([params[i].temperature for i in plain], dtype=np.float32)[:, None]  # [rows, 1]
        scaled = logprobs[plain] / temperature  # [rows, vocab]
        weights = np.exp(scaled - scaled.max(axis=-1, keepdims=True))  # [rows, vocab], unnormalised
        tokens[plain] = inverse_cdf(weights, uniforms[plain])
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
    pad = -vocab % CDF_BLOCK
    if pad:
        weights = np.concatenate([weights, np.zeros((rows, pad), dtype=weights.dtype)], axis=1)
    blocks = weights.reshape(rows, -1, CDF_BLOCK)  # [rows, n_blocks, block]
    block_cdf = np.cumsum(blocks.sum(axis=-1, dtype=np.float64), axis=-1)  # [rows, n_blocks]
    target = uniforms * block_cdf[:, -1]  # [rows]
    block = np.minimum((block_cdf <= target[:, None]).sum(axis=-1), blocks.shape[1] - 1)  # [rows]
    row = np.arange(rows)
    before = np.where(block > 0, block_cdf[row, np.maximum(block - 1, 0)], 0.0)  # [rows]
    inner_cdf = before[:, None] + np.cumsum(blocks[row, block].astype(np.float64), axis=-1)  # [rows, block]
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

    def choose(self, logprobs: np.ndarray) -> int:
        """One token id from logprobs [vocab] (the batch path with a batch of one)."""
        return int(sample_batch(logprobs[None, :], [self.params], np.array([self.draw()]))[0])


def top_candidates(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, logprob) pairs of logprobs [vocab], most likely first."""
    k = min(k, logprobs.shape[-1])
    if k == 1:  # argmax is a tenth of argpartition's cost over a 10k vocabulary
        best = int(np.argmax(logprobs))
        return [(best, float(logprobs[best]))]
    ids = np.argpartition(-logprobs, k - 1)[:k]
    ids = ids[np.argsort(-logprobs[ids], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in ids]
