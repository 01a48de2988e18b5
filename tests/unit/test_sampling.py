"""Sampling rules and request validation."""

from __future__ import annotations

import numpy as np
import pytest

from ternpool.engine.requests import SamplingParams
from ternpool.engine.sampling import candidates, make_rng, sample

pytestmark = pytest.mark.unit


def _draws(logits, params, n=4000, seed=0):
    rng = make_rng(seed)
    return np.bincount([sample(logits, params, rng) for _ in range(n)], minlength=len(logits))


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert sample(logits, SamplingParams(), make_rng(0)) == 1


def test_temperature_sampling_follows_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    counts = _draws(logits, SamplingParams(temperature=1.0))
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.03)
    sharp = _draws(logits, SamplingParams(temperature=0.25))
    assert sharp[0] / sharp.sum() > 0.85  # p^(1/T) renormalized: 0.5^4 / (0.5^4 + 0.3^4 + 0.2^4) = 0.87


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    assert set(np.nonzero(_draws(logits, SamplingParams(temperature=1.0, top_k=2)))[0]) == {0, 1}
    # smallest set with mass >= 0.6 is {0, 1}; >= 0.75 needs {0, 1, 2}
    assert set(np.nonzero(_draws(logits, SamplingParams(temperature=1.0, top_p=0.6)))[0]) == {0, 1}
    assert set(np.nonzero(_draws(logits, SamplingParams(temperature=1.0, top_p=0.75)))[0]) == {0, 1, 2}
    assert set(np.nonzero(_draws(logits, SamplingParams(temperature=1.0, top_k=1)))[0]) == {0}


def _candidates_by_sorting(logits, params):
    """The rule written plainly: every token sorted by probability (ties: lower id first), cut."""
    z = logits.astype(np.float64) / params.temperature
    order = np.lexsort((np.arange(z.shape[0]), -z))
    if 0 < params.top_k < z.shape[0]:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p * p.sum()) + 1)
        order, p = order[:keep], p[:keep]
    by_id = np.argsort(order)
    return order[by_id], (p / p.sum())[by_id]


@pytest.mark.parametrize("vocab", [5, 300, 5000])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (0.7, 0, 0.999),
                                                      (1.3, 40, 1.0), (1.0, 3, 0.5), (0.5, 0, 0.3)])
def test_candidates_are_the_sorted_rule(vocab, temperature, top_k, top_p):
    """No sort in the sampler: its candidates and probabilities are those of sorting the whole
    vocabulary, on peaked and flat logits and on logits full of ties (cut in the middle of a tie)."""
    rng = np.random.default_rng(vocab)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for logits in (rng.standard_normal(vocab) * 4, rng.standard_normal(vocab) * 0.1,
                   rng.integers(0, 4, vocab).astype(np.float64)):
        logits = logits.astype(np.float32)
        ids, p = candidates(logits, params)
        want_ids, want_p = _candidates_by_sorting(logits, params)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(p, want_p, rtol=1e-12)


def test_same_seed_same_draws():
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=20)
    a = [sample(logits, p, r) for r in [make_rng(7)] for _ in range(30)]
    b = [sample(logits, p, r) for r in [make_rng(7)] for _ in range(30)]
    c = [sample(logits, p, r) for r in [make_rng(8)] for _ in range(30)]
    assert a == b and a != c


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -3}, "seed"),
    ({"stop": ("",)}, "stop"),
    ({"stop": (3,)}, "stop"),
])
def test_invalid_params_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string_and_lists():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
