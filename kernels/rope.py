"""Rotary position embedding (rotate_half convention, as transformers' Llama and BitNet apply it).

For each token n and head, with half = D / 2 and the token's cos, sin (D/2,):
out[:half] = x1 * cos - x2 * sin and out[half:] = x2 * cos + x1 * sin, where x1, x2 are the two halves,
in float32. The kernel computes exactly those operations (no fused multiply-add), so it matches
`apply_rope_ref` bit for bit; a few tokens run on the calling thread (`norm.PARALLEL_ELEMENTS`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import NJIT, NJIT_PARALLEL, njit
from .norm import PARALLEL_ELEMENTS


def apply_rope_ref(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NumPy reference. x (N, heads, D); cos/sin (N, D/2) -> rotated (N, heads, D) float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1)


@njit(**NJIT)
def _rotate(x, cos, sin, n, out):  # pragma: no cover - compiled
    half = x.shape[2] // 2
    for h in range(x.shape[1]):
        for d in range(half):
            a, b, c, s = x[n, h, d], x[n, h, half + d], cos[n, d], sin[n, d]
            out[n, h, d] = a * c - b * s
            out[n, h, half + d] = b * c + a * s


@njit(**NJIT)
def _rope_serial(x, cos, sin, out):  # pragma: no cover - compiled
    for n in range(x.shape[0]):
        _rotate(x, cos, sin, n, out)


@njit(**NJIT_PARALLEL)
def _rope_parallel(x, cos, sin, out):  # pragma: no cover - compiled
    for n in prange(x.shape[0]):
        _rotate(x, cos, sin, n, out)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (N, heads, D) float32; cos/sin (N, D/2) float32 -> rotated (N, heads, D); `apply_rope_ref` bit for bit."""
    x = np.ascontiguousarray(x, np.float32)
    N, _, D = x.shape
    cos, sin = np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)
    if D % 2 or cos.shape != (N, D // 2) or sin.shape != cos.shape:
        raise ValueError(f"rotary tables of shape {cos.shape}, {sin.shape} do not fit x of shape {x.shape}")
    out = np.empty_like(x)
    (_rope_parallel if x.size >= PARALLEL_ELEMENTS else _rope_serial)(x, cos, sin, out)
    return out
