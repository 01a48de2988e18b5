"""Per-token absmax int8 activation quantization (BitNet b1.58).

For each row x (one token): s = 127 / max(max|x|, 1e-5) in float32,
q = clamp(round_half_even(x * s), -128, 127). The ternary matmul needs q, the
row sums of q (codes are stored as w + 1, so the kernel subtracts sum(q)) and
s to dequantize.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import NJIT, NJIT_FAST, NJIT_PARALLEL, njit

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
def _amax(y):  # pragma: no cover - compiled
    """max |y| (0 for an empty row) as the largest of the float32 bit patterns without their sign: for
    values >= 0, IEEE order is integer order, and an integer maximum vectorizes (a float one does not:
    LLVM keeps its NaN order). A NaN is the largest pattern, so it comes out as np.max's does."""
    bits = y.view(np.int32)
    m = np.int32(0)
    for k in range(bits.shape[0]):
        b = bits[k] & np.int32(0x7FFFFFFF)
        if b > m:
            m = b
    out = np.empty(1, np.int32)
    out[0] = m
    return out.view(np.float32)[0]


@njit(**NJIT_FAST)
def _codes(y, s, q, t):  # pragma: no cover - compiled
    """q[t] = clamp(rint(y * s), -128, 127); returns their sum. Fast-math (no NaN, no signed zeros)
    lets LLVM vectorize the clamp and the integer sum; each value is still one correctly rounded
    product and rint, so the codes are the in-order loop's."""
    acc = np.int32(0)
    for k in range(y.shape[0]):
        v = min(max(np.rint(y[k] * s), np.float32(-128.0)), np.float32(127.0))
        iv = np.int8(v)
        q[t, k] = iv
        acc = np.int32(acc + np.int32(iv))  # int32 lanes (|sum| <= 128 K)
    return acc


@njit(**NJIT)
def quantize_row(y, t, q, qsum, scale):  # pragma: no cover - compiled
    """Quantize the float32 row y (K,) into q[t], qsum[t], scale[t]."""
    amax = max(_amax(y), _EPS)
    s = np.float32(127.0) / amax  # exactly rounded: outside the fast-math helpers
    qsum[t] = _codes(y, s, q, t)
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
