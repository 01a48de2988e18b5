"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Each sequence owns its random generator, seeded from its request, so a seed
gives the same text whatever else shares the batch.
"""

from __future__ import annotations

import numpy as np

from .requests import SamplingParams


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits (vocab,) float32 -> token id. ValueError when the logits hold NaN or +inf."""
    top = logits.max()  # NaN propagates through max
    if not np.isfinite(top):
        raise ValueError(f"the model produced non-finite logits (max {top})")
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    idx = np.arange(z.shape[0])
    if 0 < params.top_k < z.shape[0]:
        idx = np.argpartition(-z, params.top_k - 1)[: params.top_k]
    order = idx[np.argsort(-z[idx], kind="stable")]  # candidates, most likely first
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)  # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), len(order) - 1)])
