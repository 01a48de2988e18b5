"""Per-token absmax int8 activation quantization (BitNet b1.58).

For each row x (one token): s = 127 / max(max|x|, 1e-5) in float32,
q = clamp(round_half_even(x * s), -128, 127). The ternary matmul needs q, the
row sums of q (codes are stored as w + 1, so the kernel subtracts sum(q)) and
s to dequantize.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import NJIT, NJIT_PARALLEL, njit

_EPS = np.float32(1e-5)


def quantize_rows_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference. x (T, K) float32 -> q (T, K) int8, qsum (T,) int32, scale (T,) float32."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.abs(x).max(axis=-1), _EPS)  # (T,)
    s = (np.float32(127.0) / amax).astype(np.float32)
    q = np.clip(np.round(x * s[:, None]), -128, 127).astype(np.int8)  # np.round: half to even
    qsum = q.astype(np.int32).sum(axis=-1).astype(np.int32)
    return q, qsum, s


@njit(**NJIT)
def quantize_row(y, t, q, qsum, scale):  # pragma: no cover - compiled
    """Quantize the float32 row y (K,) into q[t], qsum[t], scale[t]."""
    K = y.shape[0]
    amax = np.float32(0.0)
    for k in range(K):
        a = abs(y[k])
        if a > amax:
            amax = a
    if amax < _EPS:
        amax = _EPS
    s = np.float32(127.0) / amax
    acc = 0
    for k in range(K):
        v = np.rint(y[k] * s)
        if v > 127.0:
            v = np.float32(127.0)
        elif v < -128.0:
            v = np.float32(-128.0)
        iv = np.int8(v)
        q[t, k] = iv
        acc += np.int32(iv)
    qsum[t] = np.int32(acc)
    scale[t] = s


@njit(**NJIT_PARALLEL)
def _quantize_rows(x, q, qsum, scale):  # pragma: no cover - compiled
    for t in prange(x.shape[0]):
        quantize_row(x[t], t, q, qsum, scale)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize each row of x (T, K) float32; same results as `quantize_rows_ref`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (tokens, features) array, got shape {x.shape}")
    T, K = x.shape
    q = np.empty((T, K), dtype=np.int8)
    qsum = np.empty(T, dtype=np.int32)
    scale = np.empty(T, dtype=np.float32)
    _quantize_rows(x, q, qsum, scale)
    return q, qsum, scale
