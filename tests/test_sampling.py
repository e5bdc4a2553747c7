"""Exact speculative sampling: the emitted tokens follow the target's distribution whatever the drafter does."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mtp.runtime.sampling import SamplingConfig, accept_sampled, probabilities, sample

V = 6
P = np.array([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
DRAFTERS = {
    "q equals p": P,
    "uniform q": np.full(V, 1 / V),
    "disjoint support": np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5]),
    "one-hot q (argmax drafter)": np.eye(V)[3],
}
DRAWS = 100_000


def _speculative_draws(q: np.ndarray, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """First and second emitted token of `draws` rounds (G=2) against a target that always says P."""
    cfg = SamplingConfig(temperature=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    logits = np.log(P)
    rows = np.stack([logits] * 3)
    first, second = np.empty(draws, int), np.empty(draws, int)
    for n in range(draws):
        drafts = [sample(q, rng), sample(q, rng)]
        k, nxt = accept_sampled(drafts, [q, q], rows, cfg, rng)
        emitted = drafts[:k] + [nxt]
        first[n] = emitted[0]
        second[n] = emitted[1] if len(emitted) > 1 else -1
    return first, second


def _chi_square_ok(samples: np.ndarray, p: np.ndarray) -> tuple[bool, float, float]:
    from scipy.stats import chisquare

    counts = np.bincount(samples, minlength=V)
    _, pvalue = chisquare(counts, p * counts.sum())
    tv = 0.5 * np.abs(counts / counts.sum() - p).sum()
    tv_bound = 2 * np.sqrt(V / counts.sum())  # a few standard errors of the empirical distribution
    return pvalue > 1e-3 and tv < tv_bound, pvalue, tv


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_output_distribution_equals_the_target(name):
    first, second = _speculative_draws(DRAFTERS[name], DRAWS // len(DRAFTERS) * 2, seed=7)
    ok, pvalue, tv = _chi_square_ok(first, P)
    assert ok, f"first token: p-value {pvalue:.2e}, total variation {tv:.4f}"
    ok, pvalue, tv = _chi_square_ok(second[second >= 0], P)
    assert ok, f"second token: p-value {pvalue:.2e}, total variation {tv:.4f}"


def test_a_biased_rule_is_detected():
    """The statistical check has power: accepting every draft (no residual correction) fails it."""
    rng = np.random.default_rng(3)
    q = DRAFTERS["uniform q"]
    biased = np.array([sample(q, rng) for _ in range(20_000)])
    assert not _chi_square_ok(biased, P)[0]


def test_top_k_top_p_and_temperature():
    logits = np.log(P)
    assert np.allclose(probabilities(logits, SamplingConfig(1.0)), P)
    top2 = probabilities(logits, SamplingConfig(1.0, top_k=2))
    assert np.allclose(top2, np.r_[P[:2] / P[:2].sum(), np.zeros(4)])
    nucleus = probabilities(logits, SamplingConfig(1.0, top_p=0.7))
    assert np.count_nonzero(nucleus) == 3 and np.isclose(nucleus.sum(), 1)
    cold = probabilities(logits, SamplingConfig(0.05))
    assert cold[0] > 0.99
