"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Each sequence owns its random generator, seeded from its request, so a seed
gives the same text whatever else shares the batch.

Nothing here sorts the vocabulary (a 128k-token sort costs ~14 ms a row, more than the
rest of a 32-stream decode step's share of it): top-k is a partition, top-p
partitions the most likely tokens in growing steps until they hold the mass asked
for, and the draw walks the candidates in token-id order (the distribution is
the same in any order).
"""

from __future__ import annotations

import numpy as np

from .requests import SamplingParams

NUCLEUS_FIRST = 64  # top-p looks at this many most likely tokens first, then 8x more each time short


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw at temperature > 0 can pick and their probabilities (ids ascending, float64,
    summing to 1): softmax(logits / temperature) cut to the `top_k` most likely, then to the fewest
    most likely holding at least `top_p` of the mass (ties at a cut: lower ids first)."""
    z = logits.astype(np.float64) / params.temperature
    ids = None
    if 0 < params.top_k < z.shape[0]:
        ids = np.sort(most_likely(z, params.top_k))
        z = z[ids]
    p = np.exp(z - z.max())
    if params.top_p < 1.0:
        keep = _nucleus(p, params.top_p * p.sum())
        ids = keep if ids is None else ids[keep]
        p = p[keep]
    if ids is None:
        ids = np.arange(p.shape[0])
    return ids, p / p.sum()


def most_likely(z: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of z, ties broken toward lower indices (in no order)."""
    part = np.argpartition(-z, k - 1)[:k]
    cut = z[part].min()
    above = part[z[part] > cut]  # all of these are in any top k; the rest are ties at `cut`, lowest ids first
    return np.concatenate([above, np.flatnonzero(z == cut)[: k - above.shape[0]]])


def _nucleus(p: np.ndarray, mass: float) -> np.ndarray:
    """Ascending indices of the fewest largest p (ties toward lower indices) whose sum reaches `mass`."""
    k = min(NUCLEUS_FIRST, p.shape[0])
    while True:
        top = most_likely(p, k)
        top = top[np.lexsort((top, -p[top]))]  # most likely first, then by id
        reach = np.cumsum(p[top])
        if reach[-1] >= mass or k == p.shape[0]:
            keep = min(int(np.searchsorted(reach, mass)) + 1, k)  # smallest prefix with sum >= mass
            return np.sort(top[:keep])
        k = min(k * 8, p.shape[0])


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits (vocab,) float32 -> token id. ValueError when the logits hold NaN or +inf."""
    return draw(logits, params, rng)[0]


def draw(logits: np.ndarray, params: SamplingParams,
         rng: np.random.Generator) -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
    """`sample`, also handing back the `candidates` the token was drawn from (None when greedy), so
    processed log-probabilities (engine/logprobs.py) cost no second pass over the vocabulary."""
    top = logits.max()  # NaN propagates through max
    if not np.isfinite(top):
        raise ValueError(f"the model produced non-finite logits (max {top})")
    if params.temperature == 0.0:
        return int(np.argmax(logits)), None
    ids, p = candidates(logits, params)
    return int(ids[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), ids.shape[0] - 1)]), (ids, p)
