"""Causal grouped-query attention over a slotted KV cache.

Each token n belongs to cache slot `slots[n]` at position `pos[n]` and
attends to positions 0..pos[n] of its slot (its own K/V already written).
Query head h reads KV head h // (H // KVH).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import NJIT_PARALLEL_FAST, njit


@njit(**NJIT_PARALLEL_FAST)
def _attention(q, k_cache, v_cache, slots, pos, scale, out):  # pragma: no cover - compiled
    N, H, D = q.shape
    group = H // k_cache.shape[1]
    for task in prange(N * H):
        n = task // H
        h = task - n * H
        kvh = h // group
        s = slots[n]
        length = pos[n] + 1
        scores = np.empty(length, dtype=np.float32)
        best = -np.inf
        for j in range(length):
            acc = np.float32(0.0)
            for d in range(D):
                acc += q[n, h, d] * k_cache[s, kvh, j, d]
            acc *= scale
            scores[j] = acc
            if acc > best:
                best = acc
        total = np.float32(0.0)
        for j in range(length):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        for d in range(D):
            out[n, h, d] = 0.0
        for j in range(length):
            p = scores[j] / total
            for d in range(D):
                out[n, h, d] += p * v_cache[s, kvh, j, d]


def attention(q, k_cache, v_cache, slots, pos, scale: float) -> np.ndarray:
    """q (N, H, D); k/v_cache (S, KVH, C, D) float32; slots, pos (N,) int64 -> (N, H, D)."""
    N, H, D = q.shape
    if H % k_cache.shape[1] or k_cache.shape[3] != D:
        raise ValueError(f"query shape {q.shape} does not fit cache shape {k_cache.shape}")
    if N and int(np.max(pos)) >= k_cache.shape[2]:
        raise ValueError(f"position {int(np.max(pos))} is past the cache length {k_cache.shape[2]}")
    out = np.empty((N, H, D), dtype=np.float32)
    _attention(np.ascontiguousarray(q, np.float32), k_cache, v_cache,
               np.asarray(slots, np.int64), np.asarray(pos, np.int64), np.float32(scale), out)
    return out


def attention_ref(q, k_cache, v_cache, slots, pos, scale: float) -> np.ndarray:
    """NumPy reference (float64)."""
    N, H, D = q.shape
    group = H // k_cache.shape[1]
    out = np.empty((N, H, D), dtype=np.float32)
    for n in range(N):
        for h in range(H):
            k = k_cache[slots[n], h // group, : pos[n] + 1].astype(np.float64)  # (L, D)
            v = v_cache[slots[n], h // group, : pos[n] + 1].astype(np.float64)
            s = k @ q[n, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[n, h] = (p / p.sum()) @ v
    return out
