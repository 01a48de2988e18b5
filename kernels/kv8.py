"""The int8 KV cache's rows: K or V of one token and one KV head quantized to int8, with its scale.

A row of head_dim D float32 values x becomes D + SCALE_BYTES int8 bytes:
the D values q = clamp(round_half_even(x / d), -127, 127) with d = max|x| / 127
(symmetric absmax; an all-zero row has d = 0 and q = 0), then d's float32
bytes, little-endian. x is read back as float32(q) * d. Keeping the scale in
the row (as llama.cpp's q8_0 blocks do) keeps the cache one array per K and
V, a row self-contained, and its bytes a quarter of float32's plus 4.

One scale per (token, KV head) rather than per channel or per group of 32
channels: the cache is written a token at a time, and on the test models
groups of 32 or 64 agreed no better with the float32 cache (README, "KV
cache").
"""

from __future__ import annotations

import numpy as np

from .config import NJIT, njit

SCALE_BYTES = 4  # the float32 scale that ends each row


def row_width(head_dim: int) -> int:
    """int8 bytes of one cache row of `head_dim` values."""
    return head_dim + SCALE_BYTES


def quantize_kv(x: np.ndarray) -> np.ndarray:
    """x (..., D) float32 -> rows (..., D + SCALE_BYTES) int8: the values, then the scale's bytes."""
    x = np.asarray(x, dtype=np.float32)
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127.0)  # (..., 1) float32
    q = np.rint(np.divide(x, d, out=np.zeros_like(x), where=d > 0))  # np.rint: half to even
    q = np.clip(q, -127, 127).astype(np.int8)  # (..., D)
    return np.concatenate((q, d.astype("<f4").view(np.int8)), axis=-1)  # (..., D + 4)


def dequantize_kv(rows: np.ndarray) -> np.ndarray:
    """rows (..., D + SCALE_BYTES) int8 -> (..., D) float32: each value times its row's scale (NumPy reference)."""
    rows = np.asarray(rows, dtype=np.int8)
    D = rows.shape[-1] - SCALE_BYTES
    d = np.ascontiguousarray(rows[..., D:]).view("<f4").astype(np.float32)  # (..., 1)
    return rows[..., :D].astype(np.float32) * d


@njit(**NJIT)
def dequantize_row(cache, s, kvh, j, bits, row):  # pragma: no cover - compiled
    """cache[s, kvh, j] (an int8 row) read into `row` (D,) float32, a float32 view of the uint32 scratch
    `bits`; returns `row`. The same float32 products as `dequantize_kv`."""
    D = row.shape[0]
    scale_bits = np.uint32(0)
    for b in range(SCALE_BYTES):
        scale_bits |= (np.uint32(cache[s, kvh, j, D + b]) & np.uint32(0xFF)) << np.uint32(8 * b)
    bits[0] = scale_bits
    scale = row[0]
    for d in range(D):
        row[d] = np.float32(cache[s, kvh, j, d]) * scale
    return row
