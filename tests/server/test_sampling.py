"""Sampling: greedy, top-k, top-p, reproducibility, and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.server.errors import InvalidArgument
from rnnserve.server.sampling import Sampler, SamplingParams, log_softmax, top_candidates

LOGPROBS = log_softmax(np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)))


def draw(params: SamplingParams, n: int = 2000) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.choose(LOGPROBS) for _ in range(n)])


def test_log_softmax_normalises() -> None:
    out = log_softmax(np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(np.exp(out).sum(axis=-1), 1.0, rtol=1e-6)
    assert np.isfinite(out[1, 0])


def test_greedy_is_argmax() -> None:
    assert set(draw(SamplingParams(temperature=0.0), 20)) == {0}


def test_top_k_keeps_only_k_most_likely() -> None:
    assert set(draw(SamplingParams(temperature=1.0, top_k=2, seed=1))) == {0, 1}


def test_top_p_keeps_the_nucleus() -> None:
    # 0.5 + 0.3 = 0.8 >= 0.75: the nucleus is {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.75, seed=2))) == {0, 1}


def test_temperature_one_follows_the_distribution() -> None:
    counts = np.bincount(draw(SamplingParams(temperature=1.0, seed=3), 20000), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.02)


def test_same_seed_same_tokens_different_seed_differs() -> None:
    a = draw(SamplingParams(temperature=1.0, seed=7), 200)
    b = draw(SamplingParams(temperature=1.0, seed=7), 200)
    c = draw(SamplingParams(temperature=1.0, seed=8), 200)
    assert (a == b).all()
    assert (a != c).any()


@pytest.mark.parametrize(
    ("params", "word"),
    [
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_k=5), "top_k"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
    ],
)
def test_nonsense_parameters_are_rejected_by_name(params: SamplingParams, word: str) -> None:
    with pytest.raises(InvalidArgument, match=word):
        params.validate(vocab_size=4)


def test_top_candidates_sorted() -> None:
    top = top_candidates(LOGPROBS, 3)
    assert [i for i, _ in top] == [0, 1, 2]
    assert top[0][1] == pytest.approx(np.log(0.5), abs=1e-5)


def test_inverse_cdf_equals_searchsorted_on_the_cumulative_sum_alone_or_batched() -> None:
    from rnnserve.server.sampling import inverse_cdf

    rng = np.random.default_rng(0)
    for vocab in (3, 96, 128, 1000, 10_000):
        weights = np.exp(3 * rng.standard_normal((20, vocab)))
        uniforms = rng.random(20)
        cdfs = np.cumsum(weights, axis=-1)
        expected = [
            min(int(np.searchsorted(c, u * c[-1], side="right")), vocab - 1)
            for c, u in zip(cdfs, uniforms, strict=True)
        ]
        assert inverse_cdf(weights, uniforms).tolist() == expected
        alone = [int(inverse_cdf(weights[r : r + 1], uniforms[r : r + 1])[0]) for r in range(20)]
        assert alone == expected


def test_batch_sampling_gives_each_row_what_it_gets_alone() -> None:
    from rnnserve.server.sampling import sample_batch

    rng = np.random.default_rng(1)
    logprobs = log_softmax(3 * rng.standard_normal((8, 500)).astype(np.float32))
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p)
        for t, k, p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8)] * 2
    ]
    uniforms = rng.random(8)
    together = sample_batch(logprobs, params, uniforms).tolist()
    alone = [
        int(sample_batch(logprobs[r : r + 1], params[r : r + 1], uniforms[r : r + 1])[0]) for r in range(8)
    ]
    assert together == alone


def test_top_one_candidate_is_the_argmax_like_the_first_of_several() -> None:
    (best,) = top_candidates(LOGPROBS, 1)
    assert best == top_candidates(LOGPROBS, 3)[0]
    assert best[0] == int(np.argmax(LOGPROBS))


def test_temperature_one_rows_draw_from_the_weights_met_in_log_softmax() -> None:
    from rnnserve.server.sampling import inverse_cdf, log_softmax_and_weights, sample_batch

    rng = np.random.default_rng(2)
    logits = 3 * rng.standard_normal((6, 700)).astype(np.float32)
    logprobs, weights = log_softmax_and_weights(logits)
    np.testing.assert_allclose(logprobs, log_softmax(logits), atol=1e-6)
    np.testing.assert_allclose(weights / weights.sum(axis=-1, keepdims=True), np.exp(logprobs), rtol=1e-5)
    params = [SamplingParams(temperature=t) for t in (1.0, 0.0, 1.0, 0.5, 1.0, 1.0)]
    uniforms = rng.random(6)
    together = sample_batch(logprobs, params, uniforms, weights).tolist()
    alone = [
        int(sample_batch(logprobs[r : r + 1], params[r : r + 1], uniforms[r : r + 1], weights[r : r + 1])[0])
        for r in range(6)
    ]
    assert together == alone
    at_one = [0, 2, 4, 5]
    assert [together[r] for r in at_one] == inverse_cdf(weights[at_one], uniforms[at_one]).tolist()
